"""Hand-written SQL for the protocol hot paths, typed by Django's own field machinery.

The token, backchannel and redemption endpoints run a handful of statements per
request; building them through the ORM costs several times what executing them
does (query compilation and model instantiation, ~0.3-1.5 ms a statement). These
helpers keep the SQL short and explicit while every value still goes through the
model field that owns it: parameters through ``get_db_prep_save`` and results
through the backend's and the field's converters, exactly as the ORM would. So the
same statement runs on PostgreSQL (production) and SQLite (a laptop).

Only the hot paths use this; everything else stays on the ORM.
"""

from collections.abc import Sequence
from functools import cache
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections, models
from django.db.models import Field, Model


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def column(model: type[Model], name: str) -> Field:
    return model._meta.get_field(name)  # type: ignore[return-value]


# Fields whose Python values go to the database as they are, on every backend we run on.
_AS_IS = (models.CharField, models.TextField, models.IntegerField, models.BigIntegerField,
          models.PositiveIntegerField, models.PositiveSmallIntegerField, models.BigAutoField, models.AutoField)


@cache
def _prep(vendor: str, model: type[Model], name: str):
    field = column(model, name)
    target = field.target_field if isinstance(field, models.ForeignKey) else field
    return None if type(target) in _AS_IS else field.get_db_prep_save


def param(model: type[Model], name: str, value: Any, conn=None) -> Any:
    """A Python value as the database wants it for ``model.name`` (datetimes, UUIDs, JSON)."""
    conn = conn or connections[DEFAULT_DB_ALIAS]
    prep = _prep(conn.vendor, model, name)
    return value if prep is None or value is None else prep(value, conn)


@cache
def _converters(vendor: str, model: type[Model], name: str):
    field = column(model, name)
    col = field.get_col(model._meta.db_table)
    return tuple(connection.ops.get_db_converters(col) + col.get_db_converters(connection)), col


class Columns:
    """Fields of one model read by a hand-written SELECT, under a table alias.

    ``sql`` is the select list; ``load`` turns the matching slice of a result row
    into ``{field name: Python value}``.
    """

    def __init__(self, model: type[Model], alias: str, names: Sequence[str]):
        self.model, self.alias, self.names = model, alias, tuple(names)
        quote = connection.ops.quote_name
        self.sql = ", ".join(f"{alias}.{quote(column(model, n).column)}" for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, values: Sequence[Any]) -> dict[str, Any]:
        conn = connections[DEFAULT_DB_ALIAS]
        out = {}
        for name, value in zip(self.names, values, strict=True):
            converters, col = _converters(conn.vendor, self.model, name)
            for convert in converters:
                value = convert(value, col, conn)
            out[name] = value
        return out


def split(row: Sequence[Any], *parts: Columns) -> list[dict[str, Any]]:
    """Cut one result row into a dict per ``Columns``, in select-list order."""
    out, start = [], 0
    for part in parts:
        out.append(part.load(row[start:start + len(part)]))
        start += len(part)
    return out


def instance(model: type[Model], values: dict[str, Any]) -> Model:
    """A model instance of exactly these (already converted) fields; others stay deferred."""
    by_attname = {column(model, n).attname: v for n, v in values.items()}
    ordered = [f.attname for f in model._meta.concrete_fields if f.attname in by_attname]  # from_db's order
    return model.from_db(connection.alias, ordered, [by_attname[a] for a in ordered])


@cache
def _insert_sql(vendor: str, model: type[Model], names: tuple[str, ...], skip_conflicts: bool) -> str:
    quote = connection.ops.quote_name
    cols = ", ".join(quote(column(model, n).column) for n in names)
    marks = ", ".join(["%s"] * len(names))
    sql = f"INSERT INTO {table(model)} ({cols}) VALUES ({marks})"
    if skip_conflicts:
        sql += " ON CONFLICT DO NOTHING"
    return sql + f" RETURNING {quote(model._meta.pk.column)}"


def insert(model: type[Model], values: dict[str, Any], *, skip_conflicts: bool = False) -> Any:
    """One INSERT of these field values; returns the new primary key.

    ``skip_conflicts``: a row that would break a unique constraint is not written, and
    None is returned instead of raising (so no savepoint is needed around it).
    """
    conn = connections[DEFAULT_DB_ALIAS]
    names = tuple(values)
    params = [param(model, n, v, conn) for n, v in values.items()]
    with conn.cursor() as cursor:
        cursor.execute(_insert_sql(conn.vendor, model, names, skip_conflicts), params)
        row = cursor.fetchone()
    return None if row is None else row[0]


def insert_instance(obj: Model, *, skip_conflicts: bool = False) -> Any:
    """INSERT an unsaved model instance with every concrete field as it stands (defaults applied)."""
    values = {f.name: getattr(obj, f.attname) for f in obj._meta.concrete_fields}
    return insert(type(obj), values, skip_conflicts=skip_conflicts)


def execute(sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement; returns the row count (which decides races)."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def fetchone(sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def for_update(of: str) -> str:
    """``FOR UPDATE OF alias`` where the database has row locks (SQLite serialises writers instead)."""
    return f" FOR UPDATE OF {of}" if connection.features.has_select_for_update_of else ""

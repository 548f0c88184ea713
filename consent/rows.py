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

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar, cast

from django.db import DEFAULT_DB_ALIAS, connection, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.models import Field, Model
from django.db.models.base import ModelState
from django.db.models.expressions import Col

if TYPE_CHECKING:
    from audit.services import PendingEvent

M = TypeVar("M", bound=Model)
# One step of a Batch's shape: (kind, name, model, (field, ref CTE or None)..., (column, SQL)...).
BatchStep = tuple[str, str, type[Model], tuple[tuple[str, str | None], ...], tuple[tuple[str, str], ...]]


# Kept cursors per driver connection: one per statement text, the oldest closed past this many.
KEPT_STATEMENTS = 64


class _Bound(threading.local):
    conn: BaseDatabaseWrapper | None = None  # the class default: no lookup miss on a fresh thread


_bound = _Bound()


def db() -> BaseDatabaseWrapper:
    """This thread's connection to the default database: the one bound to the running request (``bind``),
    or Django's lookup. Each ``connections[alias]`` costs ~11,000 instructions (asgiref's
    thread-critical ``Local`` raises and catches an exception to tell a synchronous thread from an
    event loop, and a second one for the attribute miss that reaches its ``__getattr__``): seven a
    code exchange, 3.5 % of its instructions before the protocol lane bound its connection."""
    conn = _bound.conn
    return conn if conn is not None else connections[DEFAULT_DB_ALIAS]


def bind(conn: BaseDatabaseWrapper | None) -> BaseDatabaseWrapper | None:
    """From now on this thread's ``db()`` is ``conn`` (None: Django's lookup again); returns the one
    bound before, to bind back when the request ends. ``conn`` must be the wrapper
    ``connections[DEFAULT_DB_ALIAS]`` gives this thread (``config.wsgi.ProtocolLane`` looks it up
    once per request)."""
    outer, _bound.conn = _bound.conn, conn
    return outer


def cursor(sql: str) -> CursorWrapper | Statement:
    """A cursor that sends parameters apart from the SQL on PostgreSQL (server-side binding).

    Django's default psycopg cursor renders every parameter into the SQL text in Python
    (client-side binding); for a statement with thirty parameters that is most of the
    client's cost of running it. Server-side binding lets psycopg's C dumpers do it.

    Outside a query log, the kept cursor of statement ``sql`` on this connection
    (``Statement``): psycopg keeps a cursor's adapters (a dumper per parameter type, a loader
    per result column) only while the same query runs on it again, so a cursor per statement,
    or one shared by two statements, paid for looking them all up again every time (a fifth of
    the client's cost of a statement). While Django logs queries (``CaptureQueriesContext``,
    ``DEBUG``) or a test wraps execution (``execute_wrapper``), a fresh cursor wrapped by
    Django (``_prepare_cursor``), so they see these statements as any other.
    """
    conn = db()
    if conn.vendor != "postgresql":
        return conn.cursor()
    conn.close_if_health_check_failed()
    conn.ensure_connection()
    if conn.queries_logged or conn.execute_wrappers:
        from django.db.backends.postgresql.base import ServerBindingCursor

        with conn.wrap_database_errors:
            # Django's own wrapping of a cursor it opened, private API absent from the stubs.
            return conn._prepare_cursor(ServerBindingCursor(conn.connection))  # type: ignore[attr-defined, call-arg, no-any-return]
    conn.validate_thread_sharing()
    return Statement(conn, sql)


class Statement:
    """``with`` this: the kept server-binding cursor of one statement, under Django's error wrapping.

    What Django's ``CursorWrapper.execute`` does around a statement, kept: a transaction that must
    roll back refuses new statements (``validate_no_broken_transaction``) and a driver error comes
    out as ``django.db``'s (``wrap_database_errors``, which also marks the connection for
    ``close_if_unusable_or_obsolete``). Not closed on exit (it is kept); its last result is dropped
    by the statement's next run.
    """

    __slots__ = ("conn", "sql")

    def __init__(self, conn: BaseDatabaseWrapper, sql: str):
        self.conn, self.sql = conn, sql

    def __enter__(self) -> Any:
        conn = self.conn
        conn.validate_no_broken_transaction()
        # Kept on the driver connection itself, which the pool hands from thread to thread: kept on
        # Django's per-thread wrapper, they were lost whenever the thread's next request took
        # another pooled connection (a page request hands its connection back at the end), and
        # every parameter's dumper was looked up again on the new cursors.
        driver = conn.connection
        kept: KeptCursors | None = getattr(driver, "_rows_cursors", None)
        if kept is None:
            kept = KeptCursors(conn)
            setattr(driver, "_rows_cursors", kept)  # noqa: B010 - psycopg's Connection declares no such attribute
        return kept.get(self.sql)

    def __exit__(self, *exc: Any) -> None:
        self.conn.wrap_database_errors.__exit__(*exc)


class KeptCursors:
    """The server-binding cursors of one driver connection, by statement text.

    They belong to that connection, whichever thread the pool lends it to (one at a time); a new
    connection starts a new set. ``timestamptz`` is read with psycopg's C loader where the session's
    time zone is the one Django wants (Django registers a Python subclass of it only to set the
    zone, and the session's own zone gives the same aware datetimes).
    """

    def __init__(self, conn: BaseDatabaseWrapper):
        from psycopg.types.datetime import TimestamptzLoader

        self.connection = conn.connection
        self.by_sql: dict[str, Any] = {}
        self.loader = TimestamptzLoader if self.connection.info.timezone == conn.timezone else None

    def get(self, sql: str) -> Any:
        found = self.by_sql.get(sql)
        if found is not None and not found.closed:
            return found
        from django.db.backends.postgresql.base import ServerBindingCursor

        if len(self.by_sql) >= KEPT_STATEMENTS:
            self.by_sql.pop(next(iter(self.by_sql))).close()
        # a psycopg Cursor (the stubs type Django's subclass without its driver base)
        kept: Any = ServerBindingCursor(self.connection)  # type: ignore[call-arg]
        self.by_sql[sql] = kept
        if self.loader is not None:
            kept.adapters.register_loader("timestamptz", self.loader)
        return kept


@cache
def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def column(model: type[Model], name: str) -> Field[Any, Any]:
    return model._meta.get_field(name)  # type: ignore[return-value]


def db_column(model: type[Model], name: str) -> str:
    """The column of a concrete field (``Field.column`` is None only for fields that have none)."""
    return cast(str, column(model, name).column)


def pk_column(model: type[Model]) -> str:
    return cast(str, model._meta.pk.column)


# Fields whose Python values go to the database as they are, on every backend we run on.
_AS_IS = (
    models.CharField,
    models.TextField,
    models.IntegerField,
    models.BigIntegerField,
    models.PositiveIntegerField,
    models.PositiveSmallIntegerField,
    models.BigAutoField,
    models.AutoField,
)


# And on PostgreSQL (psycopg adapts them natively): aware datetimes, booleans, UUIDs.
_AS_IS_POSTGRESQL = (*_AS_IS, models.DateTimeField, models.BooleanField, models.UUIDField)


@cache
def _prep(vendor: str, model: type[Model], name: str) -> Callable[[Any, BaseDatabaseWrapper], Any] | None:
    field = column(model, name)
    target = field.target_field if isinstance(field, models.ForeignKey) else field
    as_is = _AS_IS_POSTGRESQL if vendor == "postgresql" else _AS_IS
    return None if type(target) in as_is else field.get_db_prep_save


@cache
def vendor() -> str:
    """The default database's vendor, read once (each ``connections[...]`` is a thread-local lookup)."""
    return connections[DEFAULT_DB_ALIAS].vendor


def param(model: type[Model], name: str, value: Any, conn: BaseDatabaseWrapper | None = None) -> Any:
    """A Python value as the database wants it for ``model.name`` (datetimes, UUIDs, JSON)."""
    prep = _prep(vendor() if conn is None else conn.vendor, model, name)
    if prep is None or value is None:
        return value
    return prep(value, conn or db())


@cache
def _converters(vendor: str, model: type[Model], name: str) -> tuple[tuple[Any, ...], Col]:
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
        self.sql = ", ".join(f"{alias}.{quote(db_column(model, n))}" for n in self.names)
        self._by_vendor: dict[str, tuple[tuple[str, tuple[Any, ...], Col], ...]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def load(self, values: Sequence[Any], conn: BaseDatabaseWrapper | None = None) -> dict[str, Any]:
        conn = conn or db()
        out = {}
        for (name, converters, col), value in zip(self._loaders(conn.vendor), values, strict=True):
            for convert in converters:
                value = convert(value, col, conn)
            out[name] = value
        return out

    def _loaders(self, vendor: str) -> tuple[tuple[str, tuple[Any, ...], Col], ...]:
        """(name, converters, column) per field, looked up once per database vendor."""
        if vendor not in self._by_vendor:
            self._by_vendor[vendor] = tuple(
                (name, *_converters(vendor, self.model, name)) for name in self.names
            )
        return self._by_vendor[vendor]


def split(row: Sequence[Any], *parts: Columns) -> list[dict[str, Any]]:
    """Cut one result row into a dict per ``Columns``, in select-list order."""
    out: list[dict[str, Any]] = []
    start = 0
    conn = db()
    for part in parts:
        out.append(part.load(row[start : start + len(part)], conn))
        start += len(part)
    return out


@cache
def _attnames(model: type[Model], names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(column(model, n).attname for n in names)


@cache
def _plain(model: type[Model]) -> bool:
    """Whether ``Model.from_db`` would do nothing but set attributes: no ``__init__`` or ``from_db`` of
    the model's own, nobody listening to ``pre_init``/``post_init``."""
    from django.db.models.signals import post_init, pre_init

    return (
        model.__init__ is Model.__init__
        and model.from_db.__func__ is Model.from_db.__func__  # type: ignore[attr-defined]
        and not pre_init.has_listeners(model)
        and not post_init.has_listeners(model)
    )


def instance(model: type[M], values: dict[str, Any]) -> M:
    """A model instance of exactly these (already converted) fields; others stay deferred.

    What ``Model.from_db`` makes, without running ``Model.__init__`` over every field (a fifth of the
    cost of reading a row) when the model adds nothing to it (``_plain``): the attributes set
    directly, as Django's own ``Model.__reduce__``/``__setstate__`` do when unpickling.
    """
    if not _plain(model):
        by_attname = dict(zip(_attnames(model, tuple(values)), values.values(), strict=True))
        ordered = [
            f.attname for f in model._meta.concrete_fields if f.attname in by_attname
        ]  # from_db's order
        return model.from_db(DEFAULT_DB_ALIAS, ordered, [by_attname[a] for a in ordered])
    obj = model.__new__(model)
    state = obj._state = ModelState()
    state.adding, state.db = False, DEFAULT_DB_ALIAS
    obj.__dict__.update(zip(_attnames(model, tuple(values)), values.values(), strict=True))
    return obj


@cache
def _insert_sql(vendor: str, model: type[Model], names: tuple[str, ...], skip_conflicts: bool) -> str:
    quote = connection.ops.quote_name
    cols = ", ".join(quote(db_column(model, n)) for n in names)
    marks = ", ".join(["%s"] * len(names))
    sql = f"INSERT INTO {table(model)} ({cols}) VALUES ({marks})"
    if skip_conflicts:
        sql += " ON CONFLICT DO NOTHING"
    return sql + f" RETURNING {quote(pk_column(model))}"


def insert(model: type[Model], values: dict[str, Any], *, skip_conflicts: bool = False) -> Any:
    """One INSERT of these field values; returns the new primary key.

    ``skip_conflicts``: a row that would break a unique constraint is not written, and
    None is returned instead of raising (so no savepoint is needed around it).
    """
    conn = db()
    names = tuple(values)
    params = [param(model, n, v, conn) for n, v in values.items()]
    sql = _insert_sql(conn.vendor, model, names, skip_conflicts)
    with cursor(sql) as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    return None if row is None else row[0]


def instance_values(obj: Model) -> dict[str, Any]:
    """Every concrete field of a model instance as it stands (defaults applied): what ``insert`` takes."""
    return {f.name: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


def insert_instance(obj: Model, *, skip_conflicts: bool = False) -> Any:
    """INSERT an unsaved model instance with every concrete field as it stands (defaults applied)."""
    return insert(type(obj), instance_values(obj), skip_conflicts=skip_conflicts)


# One str object per statement text. psycopg keeps a cursor's adapters only while the very same
# query object runs on it again (``_cursor_base._start_query``: ``is``, not ``==``), so a statement
# whose text a caller builds on every call, equal but new, had its dumpers looked up again each
# time: every parameter's type through ``AdaptersMap.get_dumper`` (14 % of a web process's GIL
# samples under bench/load.py, py-spy). Bounded: emptied when it holds ``KEPT_TEXTS`` texts.
KEPT_TEXTS = 1024
_texts: dict[str, str] = {}


def _kept_text(sql: str) -> str:
    kept = _texts.get(sql)
    if kept is None:
        if len(_texts) >= KEPT_TEXTS:
            _texts.clear()
        kept = _texts[sql] = sql
    return kept


def execute(sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement; returns the row count (which decides races)."""
    sql = _kept_text(sql)
    with cursor(sql) as cur:
        cur.execute(sql, params)
        count: int = cur.rowcount
        return count


def fetchone(sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    sql = _kept_text(sql)
    with cursor(sql) as cur:
        cur.execute(sql, params)
        row: tuple[Any, ...] | None = cur.fetchone()
        return row


@cache
def for_update(of: str) -> str:
    """``FOR UPDATE OF alias`` where the database has row locks (SQLite serialises writers instead)."""
    return f" FOR UPDATE OF {of}" if connection.features.has_select_for_update_of else ""


# --- writes that land together: one statement on PostgreSQL ---------------------------------------


class Ref:
    """The primary key written by an earlier step of the same ``Batch`` (named ``name``)."""

    def __init__(self, name: str):
        self.name = name


@cache
def _cast(vendor: str, model: type[Model], name: str) -> str:
    """The column's type, to cast a placeholder in ``INSERT ... SELECT`` (which, unlike VALUES, does not
    infer parameter types from the target column)."""
    field = column(model, name)
    target = field.target_field if isinstance(field, models.ForeignKey) else field
    return cast(str, target.cast_db_type(connection) or target.db_type(connection))


def guarded_update(
    model: type[Model], pk: Any, set_: dict[str, Any], where: str = "", params: Sequence[Any] = ()
) -> tuple[str, list[Any]]:
    """``UPDATE model SET ... WHERE pk = ... AND where RETURNING 1``: a ``Batch`` guard that takes a row once."""
    conn = db()
    quote = conn.ops.quote_name
    assignments = ", ".join(f"{quote(db_column(model, n))} = %s" for n in set_)
    sql = (
        f"UPDATE {table(model)} SET {assignments} WHERE {quote(pk_column(model))} = %s"
        f"{' AND ' + where if where else ''} RETURNING 1"
    )
    return sql, [param(model, n, v, conn) for n, v in set_.items()] + [
        param(model, model._meta.pk.name, pk, conn),
        *params,
    ]


@cache
def for_share() -> str:
    """``FOR SHARE``: hold a row still (against UPDATE and DELETE) for the rest of the transaction."""
    return " FOR SHARE" if connection.features.has_select_for_update else ""


@cache
def _insert_select_sql(
    vendor: str,
    model: type[Model],
    names: tuple[tuple[str, str | None], ...],
    exprs: tuple[tuple[str, str], ...],
    sources: tuple[str, ...],
) -> str:
    """``INSERT INTO model (...) SELECT ... FROM sources RETURNING pk AS id``: a row per row of the
    sources (CTE names). ``names``: (field name, CTE whose id it takes, or None for a parameter)."""
    quote = connection.ops.quote_name
    cols, values = [], []
    for n, ref in names:
        cols.append(quote(db_column(model, n)))
        values.append(f"%s::{_cast(vendor, model, n)}" if ref is None else f"{ref}.id")
    for col, expr in exprs:
        cols.append(quote(col))
        values.append(expr)
    return (
        f"INSERT INTO {table(model)} ({', '.join(cols)}) SELECT {', '.join(values)}"
        f" FROM {', '.join(sources)} RETURNING {quote(pk_column(model))} AS id"
    )


def event_insert(pending: PendingEvent, source: str) -> tuple[str, list[Any]]:
    """An audit event (``audit.services.PendingEvent``) as a data-modifying CTE body: written once
    per row of ``source`` (PostgreSQL)."""
    conn = db()
    model, values, sql = pending.model, pending.values(), pending.sql
    params = [param(model, n, v, conn) for n, v in values.items()]
    for _, expr_params in sql.values():
        params.extend(expr_params)
    names = tuple((n, None) for n in values)
    exprs = tuple((col, expr) for col, (expr, _) in sql.items())
    return _insert_select_sql(conn.vendor, model, names, exprs, (source,)), params


def insert_with_event(
    model: type[Model], values: dict[str, Any], pending: PendingEvent, *, skip_conflicts: bool = False
) -> Any:
    """INSERT one row (``insert``) and, only if it was written, the audit event ``pending``.

    On PostgreSQL one statement (the event's CTE reads the INSERT's: a row skipped as a conflict
    writes no event), so outside a transaction the two commit together, or neither, with no
    BEGIN and COMMIT around them; elsewhere both in one transaction. The new primary key, or None.
    """
    conn = db()
    if conn.vendor != "postgresql":
        with transaction.atomic(using=conn.alias):
            pk = insert(model, values, skip_conflicts=skip_conflicts)
            if pk is not None:
                pending.append()
            return pk
    params = [param(model, n, v, conn) for n, v in values.items()]
    event_sql, event_params = event_insert(pending, "w")
    sql = _with_event_sql(conn.vendor, model, tuple(values), skip_conflicts, event_sql)
    with cursor(sql) as cur:
        cur.execute(sql, [*params, *event_params])
        row = cur.fetchone()
    return None if row is None else row[0]


@cache
def _with_event_sql(
    vendor: str, model: type[Model], names: tuple[str, ...], skip_conflicts: bool, event_sql: str
) -> str:
    pk = connection.ops.quote_name(pk_column(model))
    return (
        f"WITH w AS ({_insert_sql(vendor, model, names, skip_conflicts)}), e AS ({event_sql})"
        f" SELECT (SELECT {pk} FROM w)"
    )


@cache
def _batch_sql(vendor: str, guard_sql: str, shape: tuple[BatchStep, ...]) -> str:
    """One ``WITH`` statement for a ``Batch`` of this shape (built once per shape, then cached)."""
    quote = connection.ops.quote_name
    ctes, selects = [f"g AS ({guard_sql})"], ["(SELECT count(*) FROM g)"]
    alias_of: dict[str, str] = {}
    for i, (kind, name, model, names, exprs) in enumerate(shape):
        alias = f"s{i}"
        if kind == "delete":
            ctes.append(
                f"{alias} AS (DELETE FROM {table(model)} t USING g"
                f" WHERE t.{quote(pk_column(model))} = %s RETURNING 1)"
            )
            continue
        refs = tuple((n, None if ref is None else alias_of[ref]) for n, ref in names)
        sources = tuple(dict.fromkeys(["g", *(ref for _, ref in refs if ref is not None)]))
        ctes.append(f"{alias} AS ({_insert_select_sql(vendor, model, refs, exprs, sources)})")
        alias_of[name] = alias
        selects.append(f"(SELECT id FROM {alias})")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(selects)}"


class Batch:
    """Writes that either all land or none do, behind one guard.

    The guard is one statement that returns a row when the writes may happen: a
    conditional ``UPDATE ... RETURNING`` (``guarded_update``: a code consumed once, a
    refresh token rotated once; the row count decides a race) or a ``SELECT ... FOR
    SHARE`` of a row that must stay as it is. The steps (INSERTs, a DELETE, an audit
    event) happen only if it returned a row. On PostgreSQL the whole batch is one
    statement of data-modifying CTEs, so a request pays one round trip and no
    BEGIN/COMMIT for it (PostgreSQL manual §7.8.4: every sub-statement runs to
    completion, in one snapshot, atomically). Elsewhere (SQLite) the same writes run
    one after another inside one transaction.

    ``run`` returns ``{step name: new primary key}``, or None when the guard returned
    no row (nothing was written).
    """

    def __init__(self, guard: tuple[str, Sequence[Any]]):
        self.guard = guard
        self.steps: list[tuple[str, str, type[Model], Any, dict[str, tuple[str, list[Any]]]]] = []

    def insert(
        self,
        name: str,
        model: type[Model],
        values: dict[str, Any],
        *,
        sql: dict[str, tuple[str, list[Any]]] | None = None,
    ) -> None:
        """INSERT one row. ``values`` (field name -> value) may hold ``Ref``s; ``sql`` sets columns by
        an SQL expression and its parameters instead (PostgreSQL only)."""
        self.steps.append(("insert", name, model, values, sql or {}))

    def delete(self, model: type[Model], pk: Any) -> None:
        self.steps.append(("delete", "", model, pk, {}))

    def event(self, name: str, pending: PendingEvent) -> None:
        """An audit event (``audit.services.PendingEvent``): part of the statement, or written alone."""
        self.steps.append(("event", name, pending.model, pending, {}))

    def run(self) -> dict[str, Any] | None:
        conn = db()
        if conn.vendor == "postgresql":
            return self._one_statement(conn)
        return self._in_order(conn)

    def _one_statement(self, conn: BaseDatabaseWrapper) -> dict[str, Any] | None:
        guard_sql, guard_params = self.guard
        params = list(guard_params)
        shape: list[BatchStep] = []
        for kind, name, model, values, sql in self.steps:
            if kind == "delete":
                params.append(param(model, model._meta.pk.name, values, conn))
                shape.append((kind, name, model, (), ()))
                continue
            if kind == "event":
                values, sql = values.values(), values.sql
            names: list[tuple[str, str | None]] = []
            for n, v in values.items():
                if isinstance(v, Ref):
                    names.append((n, v.name))
                else:
                    names.append((n, None))
                    params.append(param(model, n, v, conn))
            for _, expr_params in sql.values():
                params.extend(expr_params)
            shape.append(
                (kind, name, model, tuple(names), tuple((col, expr) for col, (expr, _) in sql.items()))
            )
        statement = _batch_sql(conn.vendor, guard_sql, tuple(shape))
        with cursor(statement) as cur:
            cur.execute(statement, params)
            row = cur.fetchone()
        if row is None or not row[0]:  # the guard's count: never None (one row always comes back)
            return None
        written = [name for kind, name, *_ in self.steps if kind != "delete"]
        return dict(zip(written, row[1:], strict=True))

    def _in_order(self, conn: BaseDatabaseWrapper) -> dict[str, Any] | None:
        with transaction.atomic(using=conn.alias, savepoint=False):
            if fetchone(*self.guard) is None:
                return None
            ids: dict[str, Any] = {}
            for kind, name, model, values, _sql in self.steps:
                if kind == "delete":
                    execute(
                        f"DELETE FROM {table(model)} WHERE {conn.ops.quote_name(pk_column(model))} = %s",
                        [param(model, model._meta.pk.name, values, conn)],
                    )
                elif kind == "event":
                    ids[name] = values.append().pk
                else:
                    ids[name] = insert(
                        model, {n: ids[v.name] if isinstance(v, Ref) else v for n, v in values.items()}
                    )
            return ids

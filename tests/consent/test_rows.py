"""The hot paths' statements (``consent.rows``) on the connection's kept cursors.

Outside a query log each statement runs on a cursor of its own, kept per driver connection; these
tests pin down that it behaves as Django's own cursor does: the same values back, driver errors as
``django.db``'s, a broken transaction refusing further statements, and a reconnect getting
cursors of its own.
"""

import datetime

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import PendingEvent, audit_event
from consent import rows
from consent.models import ScopePolicy

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the kept cursor is PostgreSQL's"),
]

NAME = "catalog:read"


def policy_row() -> tuple[object, ...] | None:
    return rows.fetchone(
        f"SELECT {rows.db_column(ScopePolicy, 'name')}, {rows.db_column(ScopePolicy, 'created')}"
        f" FROM {rows.table(ScopePolicy)} WHERE {rows.db_column(ScopePolicy, 'name')} = %s",
        [NAME],
    )


@pytest.fixture
def policy() -> ScopePolicy:
    return ScopePolicy.objects.create(
        name=NAME, audience="http://catalog.test", description="Read the catalog"
    )


def test_a_timestamp_reads_as_the_orm_reads_it(policy: ScopePolicy) -> None:
    row = policy_row()

    assert row is not None and row[0] == NAME
    created = row[1]
    assert isinstance(created, datetime.datetime) and timezone.is_aware(created)
    assert created == ScopePolicy.objects.get(pk=policy.pk).created
    assert created.utcoffset() == datetime.timedelta(0)


@pytest.mark.django_db(transaction=True)  # closing the connection ends the test's transaction
def test_a_statement_keeps_its_cursor_until_the_connection_changes(policy: ScopePolicy) -> None:
    one, other = "SELECT 1", "SELECT 2"
    with rows.cursor(one) as a, rows.cursor(one) as again, rows.cursor(other) as b:
        assert a is again and b is not a

    connection.close()
    with rows.cursor(one) as fresh:
        assert fresh is not a and fresh.connection is connection.connection
    assert policy_row() is not None


def test_kept_cursors_belong_to_the_driver_connection_the_pool_lends(policy: ScopePolicy) -> None:
    # Whichever thread's Django wrapper holds the pooled connection next finds them there.
    with rows.cursor("SELECT 1") as a:
        pass
    assert connection.connection._rows_cursors.get("SELECT 1") is a


def test_a_statement_text_built_anew_keeps_its_dumpers(
    policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from psycopg import _adapters_map

    looked_up: list[type] = []
    original = _adapters_map.AdaptersMap.get_dumper

    def counting(self: _adapters_map.AdaptersMap, cls: type, format: object) -> object:
        looked_up.append(cls)
        return original(self, cls, format)  # type: ignore[arg-type]

    def statement() -> str:  # equal text, a new str object each call, as an f-string gives
        return "".join(["SELECT %s::text, ", "%s::int"])

    assert rows.fetchone(statement(), ["a", 1]) == ("a", 1)
    monkeypatch.setattr(_adapters_map.AdaptersMap, "get_dumper", counting)
    assert rows.fetchone(statement(), ["b", 2]) == ("b", 2)
    assert looked_up == []  # psycopg reused the cursor's dumpers: it saw the same query object


def test_the_oldest_kept_cursor_is_closed_past_the_limit(policy: ScopePolicy) -> None:
    with rows.cursor("SELECT 0") as first:
        pass
    for i in range(1, rows.KEPT_STATEMENTS + 1):  # texts no other test keeps
        assert rows.fetchone(f"SELECT {i} AS filler") == (i,)

    assert first.closed
    with rows.cursor("SELECT 0") as again:
        assert again is not first and not again.closed


def test_a_driver_error_comes_out_as_djangos_and_breaks_the_transaction(policy: ScopePolicy) -> None:
    sql = f"INSERT INTO {rows.table(ScopePolicy)} SELECT * FROM {rows.table(ScopePolicy)}"

    with transaction.atomic():
        with pytest.raises(IntegrityError):
            with transaction.atomic(savepoint=False):
                rows.execute(sql)
        with pytest.raises(TransactionManagementError):
            policy_row()

    assert policy_row() is not None  # the connection recovers once the transaction is over


def test_a_query_log_sees_the_statements(policy: ScopePolicy) -> None:
    with CaptureQueriesContext(connection) as captured:
        policy_row()
        rows.execute(f"SELECT 1 FROM {rows.table(AuditEvent)} LIMIT 1")

    assert len(captured.captured_queries) == 2
    assert NAME not in captured.captured_queries[0]["sql"]  # bound apart from the SQL text


def test_db_is_the_bound_connection_and_django_s_lookup_otherwise() -> None:
    from django.db import DEFAULT_DB_ALIAS, connections

    conn = connections[DEFAULT_DB_ALIAS]
    assert rows.db() is conn  # nothing bound: Django's lookup
    outer = rows.bind(conn)
    try:
        assert outer is None
        assert rows.db() is conn
        assert rows.bind(conn) is conn  # a nested bind hands back the outer one
    finally:
        rows.bind(outer)
    assert rows.bind(None) is None


@pytest.mark.django_db(transaction=True)  # outside any transaction, as a request writes it
def test_a_row_and_its_event_land_together_and_a_skipped_row_writes_no_event() -> None:
    def event(name: str) -> PendingEvent:
        return audit_event(event="scope.changed", actor="test", detail={"scope": name})

    unsaved = ScopePolicy(name=NAME, audience="http://catalog.test", description="Read the catalog")
    unsaved.created = unsaved.updated = timezone.now()  # auto_now fields: set by save(), not here
    values = rows.instance_values(unsaved)
    del values["id"]
    with CaptureQueriesContext(connection) as captured:
        pk = rows.insert_with_event(ScopePolicy, values, event("first"), skip_conflicts=True)
    assert pk == ScopePolicy.objects.get(name=NAME).pk
    assert len(captured.captured_queries) == 1  # no BEGIN or COMMIT around the one statement
    assert AuditEvent.objects.filter(event="scope.changed", detail__scope="first").count() == 1

    # The same unique name again: skipped, and so is its event.
    assert rows.insert_with_event(ScopePolicy, values, event("again"), skip_conflicts=True) is None
    assert ScopePolicy.objects.filter(name=NAME).count() == 1
    assert not AuditEvent.objects.filter(detail__scope="again").exists()

    # Not skipped: the conflict is an error, and neither row is written.
    with pytest.raises(IntegrityError):
        rows.insert_with_event(ScopePolicy, values, event("raised"))
    assert not AuditEvent.objects.filter(detail__scope="raised").exists()

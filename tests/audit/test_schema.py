"""Tables written on every request carry no index nothing reads (audit.schema.drop_pattern_indexes)."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="pattern indexes are PostgreSQL's"),
]

TABLES = {
    "audit_auditevent": ["event", "client_id", "grant_id"],
    "consent_accesstoken": ["token_checksum", "jti"],
}
BEFORE = [("audit", "0005_ledger"), ("consent", "0010_agent_instances")]


def _indexes() -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)", [list(TABLES)])
        return dict(cursor.fetchall())


def _pattern_indexes() -> set[str]:
    return {name for name, definition in _indexes().items() if "varchar_pattern_ops" in definition}


def _migrate(target: list[tuple[str, str]]) -> None:
    MigrationExecutor(connection).migrate(target)


def test_the_columns_keep_their_own_indexes_and_lose_the_pattern_ones() -> None:
    definitions = _indexes().values()

    assert _pattern_indexes() == set()
    for table, columns in TABLES.items():
        for column in columns:
            assert any(f"ON public.{table} USING btree ({column})" in d for d in definitions), column
    assert any("UNIQUE INDEX" in d and "(token_checksum)" in d for d in definitions)


def test_migrating_back_makes_them_again_as_django_named_them() -> None:
    try:
        _migrate(BEFORE)
        again = _pattern_indexes()
    finally:
        _migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())

    assert again == {
        "audit_auditevent_event_469439ac_like",
        "audit_auditevent_client_id_b7cf9ec4_like",
        "audit_auditevent_grant_id_bccf0531_like",
        "consent_accesstoken_token_checksum_c6741116_like",
        "consent_accesstoken_jti_f900c8c5_like",
    }
    assert _pattern_indexes() == set()

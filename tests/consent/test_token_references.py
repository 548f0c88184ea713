"""The token tables' references are not FOREIGN KEY constraints, and nothing leans on them.

``consent.models.AccessToken`` and ``RefreshToken`` name their user, agent, session grant and
sibling token with ``db_constraint=False``: the constraints' checks at COMMIT were a third of
PostgreSQL's CPU per token request. What they guarded stays guarded: Django still cascades through
these references when a grant, agent or user is deleted, every reader joins the grant and the
agent, so a token row that names one that is gone authenticates nothing, and the columns keep
their indexes.
"""

import uuid

import pytest
from django.db import connection

from consent.models import AccessToken, RefreshToken, SessionGrant
from tests.conftest import OAuthFlow, Scenario

# Each request its own transaction, as in a server (the rows are changed under the tokens by raw SQL).
pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_TABLES = (AccessToken._meta.db_table, RefreshToken._meta.db_table)
REFERENCES = {
    AccessToken._meta.db_table: {"user_id", "application_id", "session_grant_id", "source_refresh_token_id"},
    RefreshToken._meta.db_table: {"user_id", "application_id", "session_grant_id", "access_token_id"},
}


def _foreign_keys(table: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.attname FROM pg_constraint c JOIN pg_attribute a"
            " ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
            " WHERE c.contype = 'f' AND c.conrelid = %s::regclass",
            [table],
        )
        return {name for (name,) in cursor.fetchall()}


def _indexed(table: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] WHERE i.indrelid = %s::regclass",
            [table],
        )
        return {name for (name,) in cursor.fetchall()}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="reads PostgreSQL's catalog")
def test_the_token_tables_keep_their_indexes_but_no_foreign_key_constraints() -> None:
    for table, columns in REFERENCES.items():
        assert not columns & _foreign_keys(table), table
        assert columns <= _indexed(table), table


def _retarget(column: str, value: uuid.UUID | int) -> None:
    """Point every token row's ``column`` at a row that does not exist (no constraint stops it now)."""
    with connection.cursor() as cursor:
        for table in TOKEN_TABLES:
            cursor.execute(f'UPDATE "{table}" SET "{column}" = %s', [value])


@pytest.mark.parametrize(
    ("column", "missing"),
    [("session_grant_id", uuid.uuid4()), ("application_id", 2**40)],
    ids=["grant gone", "agent gone"],
)
def test_a_token_whose_grant_or_agent_is_gone_authenticates_nothing(
    flow: OAuthFlow, column: str, missing: uuid.UUID | int
) -> None:
    tokens = flow.full()
    assert flow.introspect(tokens["access_token"]).json()["active"] is True
    _retarget(column, missing)

    assert flow.introspect(tokens["access_token"]).json() == {"active": False}
    refused = flow.token({"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    assert refused.status_code == 400, refused.content
    assert refused.json()["error"] == "invalid_grant"


def test_deleting_a_grant_still_deletes_its_tokens(flow: OAuthFlow, scenario: Scenario) -> None:
    tokens = flow.full()
    assert AccessToken.objects.count() == 1 and RefreshToken.objects.count() == 1
    SessionGrant.objects.all().delete()  # Django's cascade, not the database's
    assert AccessToken.objects.count() == 0 and RefreshToken.objects.count() == 0
    assert flow.introspect(tokens["access_token"]).json() == {"active": False}

"""The application's PostgreSQL role cannot rewrite history: it is created here, given
``audit_grants``, and used for real connections (and a real sealer process)."""

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings

from audit.checks import audit_role_cannot_rewrite_history
from audit.grants import LEDGER_TABLES
from audit.models import AuditCheckpoint, AuditEvent, AuditLink
from audit.services import audit_record, audit_seal_all
from consent.keys import active_signing_key
from tests.live import ROOT

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail("role tests need PostgreSQL: set DATABASE_URL=postgres://...")


@pytest.fixture
def app_role(db: None) -> Iterator[str]:
    role = f"cs_app_{secrets.token_hex(4)}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{role}" LOGIN')
    call_command("audit_grants", "--role", role, "--apply", stdout=StringIO())
    yield role
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])
        cursor.execute(f'DROP OWNED BY "{role}"')
        cursor.execute(f'DROP ROLE "{role}"')


def _url(role: str) -> str:
    db = connection.settings_dict
    return f"postgres://{role}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _as(role: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(_url(role), autocommit=True)


@pytest.fixture
def sealed(db: None) -> None:
    active_signing_key()
    for i in range(20):
        audit_record(event="token.issued", actor=f"agent:{i}")
    deadline = time.monotonic() + 90
    while AuditLink.objects.count() < 20:  # committed events wait for older transactions on the server
        assert time.monotonic() < deadline, "events stayed unsealed (a transaction left open on the server?)"
        audit_seal_all()
        time.sleep(0.05)
    assert AuditCheckpoint.objects.exists()


@pytest.mark.parametrize("table", LEDGER_TABLES)
@pytest.mark.parametrize(
    "statement",
    ["UPDATE {t} SET {c} = {c}", "DELETE FROM {t}", "TRUNCATE {t}", "ALTER TABLE {t} DISABLE TRIGGER ALL"],
)
def test_the_application_role_cannot_update_delete_or_truncate_audit_rows(
    app_role: str, sealed: None, table: str, statement: str
) -> None:
    column = {
        "audit_auditevent": "event",
        "audit_auditlink": "leaf",
        "audit_auditnode": "hash",
        "audit_auditcheckpoint": "jws",
    }[table]
    with _as(app_role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement.format(t=table, c=column))
    assert AuditLink.objects.count() == 20 and AuditEvent.objects.count() == 20


@pytest.mark.parametrize(
    "statement",
    ["DELETE FROM audit_audithead", "TRUNCATE audit_audithead", "SET session_replication_role = replica"],
)
def test_nor_remove_the_sealers_head_or_switch_triggers_off(
    app_role: str, sealed: None, statement: str
) -> None:
    with _as(app_role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_the_application_role_still_appends_and_seals(app_role: str, sealed: None) -> None:
    with _as(app_role) as conn:
        conn.execute(
            "INSERT INTO audit_auditevent (occurred_at, event, outcome, actor, client_id, grant_id, error,"
            " detail, remote_addr, xid) VALUES (now(), 'token.issued', 'ok', 'agent:restricted', '', '',"
            " '', '{}', '', pg_current_xact_id())"
        )
    env = {**os.environ, "DATABASE_URL": _url(app_role), "DATABASE_POOL": "0"}
    deadline = time.monotonic() + 90
    while True:  # a transaction open elsewhere on the server can hold sealing back for a while
        result = subprocess.run(
            [sys.executable, "manage.py", "audit_seal"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        if AuditLink.objects.count() == 21:
            break
        assert time.monotonic() < deadline, "the restricted sealer never linked the event"
        time.sleep(0.5)
    latest = AuditCheckpoint.objects.order_by("-tree_size").first()
    assert latest is not None and latest.tree_size == 21
    out = StringIO()
    call_command("audit_verify", stdout=out, stderr=StringIO())
    assert "intact: 21 events" in out.getvalue()


def test_audit_grants_check_tells_the_roles_apart(app_role: str) -> None:
    env = {**os.environ, "DATABASE_URL": _url(app_role), "DATABASE_POOL": "0"}
    result = subprocess.run(
        [sys.executable, "manage.py", "audit_grants", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and f"role {app_role} cannot UPDATE, DELETE or TRUNCATE" in result.stdout
    with pytest.raises(CommandError, match="is a superuser"):
        call_command("audit_grants", "--check", stdout=StringIO())


def test_the_system_check_warns_in_production_when_the_role_can_change_audit_rows(db: None) -> None:
    assert audit_role_cannot_rewrite_history(None, databases=["default"]) == []  # http issuer: development
    with override_settings(COUNTERSIGN={"ISSUER": "https://auth.example.com"}):
        warnings = audit_role_cannot_rewrite_history(None, databases=["default"])
    assert [w.id for w in warnings] == ["audit.W001"] and "superuser" in warnings[0].msg


def test_audit_grants_prints_what_it_would_apply(db: None) -> None:
    out = StringIO()
    call_command("audit_grants", "--role", "cs_app", "--owner", "cs_owner", stdout=out)
    sql = out.getvalue()
    assert (
        'REVOKE UPDATE, DELETE, TRUNCATE, TRIGGER, REFERENCES ON "audit_auditevent", "audit_auditlink"' in sql
    )
    assert 'ALTER DEFAULT PRIVILEGES FOR ROLE "cs_owner"' in sql

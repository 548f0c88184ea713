"""The append-only, hash-chained audit log and ``manage.py audit_verify``.

Tampering is done the way someone with database superuser access would do it:
on PostgreSQL a trigger refuses UPDATE and DELETE to the application, so the
tamperer first switches triggers off for the session (``session_replication_role
= replica``), then edits with queryset ``.update()`` or raw SQL. Events are sealed
(linked into the chain) before the tamperer starts.
"""

from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from audit.models import AuditEvent, AuditHead, AuditLink
from audit.services import _link_hash, audit_record, audit_refusal, audit_seal_all
from tests.conftest import OAuthFlow, Scenario

pytestmark = pytest.mark.django_db

TABLE = AuditEvent._meta.db_table
LINKS = AuditLink._meta.db_table


def _verify(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("audit_verify", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def verified() -> str:
    out, err = _verify()
    assert "intact" in out and err == "", (out, err)
    return out


def _verify_fails(*args: str) -> str:
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("audit_verify", *args, stdout=StringIO(), stderr=err)
    return err.getvalue()


def _tamperer_bypasses_the_trigger() -> None:
    if connection.vendor == "postgresql":
        _sql("SET session_replication_role = replica", [])


def _event_at(seq: int) -> AuditEvent:
    return AuditEvent.objects.get(link__seq=seq)


@pytest.fixture
def chain(db: None) -> Iterator[list[AuditEvent]]:
    """Ten sealed events, a mix of successes and refusals."""
    rows: list[AuditEvent] = []
    for i in range(10):
        if i % 3 == 2:
            rows.append(
                audit_refusal(
                    event="token.refused",
                    error="invalid_client",
                    actor="",
                    client_id=f"client-{i}",
                    detail={"reason": f"attempt {i}"},
                )
            )
        else:
            rows.append(
                audit_record(
                    event="token.issued",
                    actor=f"agent:client-{i}",
                    client_id=f"client-{i}",
                    grant_id=f"grant-{i}",
                    detail={"jti": f"jti-{i}", "scope": "catalog:read"},
                )
            )
    audit_seal_all()
    _tamperer_bypasses_the_trigger()
    yield rows
    if connection.vendor == "postgresql":
        _sql("SET session_replication_role = origin", [])


def _sql(statement: str, params: list[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        count: int = cursor.rowcount
        return count


# --- intact chains --------------------------------------------------------------------------------


def test_intact_chain_passes(chain: list[AuditEvent]) -> None:
    out, err = _verify()
    assert "intact" in out and "10 events" in out
    assert err == ""


def test_empty_log_passes(db: None) -> None:
    out, _ = _verify()
    assert "intact" in out


def test_chain_stays_intact_through_real_traffic_with_refusals(flow: OAuthFlow, scenario: Scenario) -> None:
    """Consent, code exchange, refresh, reuse detection and refused requests all append cleanly."""
    body = flow.full()
    flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})  # reuse
    flow.token({"grant_type": "authorization_code", "code": "x"}, auth=("nobody", "nothing"))
    flow.introspect(body["access_token"], auth=("nobody", "nothing"))
    assert AuditEvent.objects.filter(outcome="refused").count() >= 3
    out = verified()
    assert f"{AuditEvent.objects.count()} events" in out
    assert not AuditEvent.objects.filter(link__isnull=True).exists()


def test_rows_link_to_each_other_in_order(chain: list[AuditEvent]) -> None:
    links = list(AuditLink.objects.order_by("seq"))
    assert [link.seq for link in links] == list(range(1, 11))
    assert [link.event_id for link in links] == [row.pk for row in chain]  # in the order they were written
    assert links[0].prev_hash == "0" * 64
    for before, after in zip(links, links[1:], strict=False):
        assert after.prev_hash == before.hash
    head = AuditHead.objects.get(pk=1)
    assert (head.seq, head.hash) == (links[-1].seq, links[-1].hash)


def test_an_append_is_one_insert_that_touches_no_shared_row(db: None) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SQLite links inline (its writers are serialised anyway)")
    audit_record(event="token.issued", actor="agent:warm-up")
    with CaptureQueriesContext(connection) as queries:
        audit_record(event="token.issued", actor="agent:x", detail={"jti": "j"})
    statements = [q["sql"] for q in queries.captured_queries]
    assert len(statements) == 1 and statements[0].startswith(f'INSERT INTO "{TABLE}"'), statements
    assert "pg_current_xact_id()" in statements[0]


def test_an_event_is_recorded_with_its_transaction(db: None) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("transaction ids are PostgreSQL's")
    row = audit_record(event="token.issued", actor="agent:x")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_xact_id()::text")
        assert row.xid == int(cursor.fetchone()[0]) == AuditEvent.objects.get(pk=row.pk).xid


# --- unsealed events ------------------------------------------------------------------------------


def test_verify_seals_what_is_waiting_then_checks_it(chain: list[AuditEvent]) -> None:
    deferred = connection.vendor == "postgresql"  # SQLite links each event as it is written
    if deferred:
        _sql("SET session_replication_role = origin", [])
    audit_record(event="grant.revoked", actor="user:1", detail={"reason": "revoked_by_user"})
    if deferred:
        out, _ = _verify("--no-seal")
        assert "10 events" in out and "1 newer events not sealed yet" in out
    out = verified()
    assert f"11 events (sealed {int(deferred)} now)" in out and "not sealed" not in out


# --- the model refuses to change history ----------------------------------------------------------


def test_save_on_an_existing_row_is_refused(chain: list[AuditEvent]) -> None:
    row = _event_at(4)
    row.detail = {"reason": "nothing to see"}
    with pytest.raises(RuntimeError):
        row.save()
    assert _event_at(4).detail == chain[3].detail
    verified()


def test_save_with_update_fields_is_refused_too(chain: list[AuditEvent]) -> None:
    row = _event_at(3)
    row.outcome = "ok"
    with pytest.raises(RuntimeError):
        row.save(update_fields=["outcome"])
    assert _event_at(3).outcome == "refused"


def test_delete_is_refused(chain: list[AuditEvent]) -> None:
    row = _event_at(5)
    with pytest.raises(RuntimeError):
        row.delete()
    assert AuditEvent.objects.filter(pk=row.pk).exists()
    verified()


def test_links_cannot_be_saved_or_deleted_through_the_model(chain: list[AuditEvent]) -> None:
    link = AuditLink.objects.get(seq=2)
    with pytest.raises(RuntimeError):
        link.save()
    with pytest.raises(RuntimeError):
        link.delete()
    assert AuditLink.objects.filter(seq=2).exists()
    verified()


# --- tampering is detected ------------------------------------------------------------------------


def test_row_edited_with_queryset_update_is_detected(chain: list[AuditEvent]) -> None:
    assert AuditEvent.objects.filter(pk=_event_at(4).pk).update(detail={"jti": "forged"}) == 1
    err = _verify_fails()
    assert "position 4" in err and "edited" in err


def test_refusal_rewritten_as_success_with_raw_sql_is_detected(chain: list[AuditEvent]) -> None:
    assert chain[2].outcome == "refused"
    assert _sql(f"UPDATE {TABLE} SET outcome = %s, error = %s WHERE id = %s", ["ok", "", chain[2].pk]) == 1
    err = _verify_fails()
    assert "position 3" in err


@pytest.mark.parametrize(
    "column, value",
    [
        ("event", "token.refreshed"),
        ("actor", "agent:someone-else"),
        ("client_id", "someone-else"),
        ("grant_id", "another-grant"),
        ("remote_addr", "10.0.0.1"),
    ],
)
def test_any_edited_column_is_detected(chain: list[AuditEvent], column: str, value: str) -> None:
    assert _sql(f"UPDATE {TABLE} SET {column} = %s WHERE id = %s", [value, chain[5].pk]) == 1
    assert "position 6" in _verify_fails()


def test_edited_timestamp_is_detected(chain: list[AuditEvent]) -> None:
    from datetime import timedelta

    from django.db.models import F

    assert (
        AuditEvent.objects.filter(pk=chain[6].pk).update(occurred_at=F("occurred_at") - timedelta(hours=1))
        == 1
    )
    assert "position 7" in _verify_fails()


def test_edited_row_with_its_link_hash_recomputed_is_caught_by_its_leaf_and_the_next_link(
    chain: list[AuditEvent],
) -> None:
    """An editor who also recomputes the edited event's link hash is caught by the event's leaf hash
    and by the next link's prev_hash."""
    row = _event_at(5)
    row.detail = {"jti": "forged"}
    link = AuditLink.objects.get(seq=5)
    forged_hash = _link_hash(row, seq=5, prev_hash=link.prev_hash)
    AuditEvent.objects.filter(pk=row.pk).update(detail={"jti": "forged"})
    AuditLink.objects.filter(seq=5).update(hash=forged_hash)
    err = _verify_fails()
    assert "position 5: event" in err and "leaf hash" in err
    assert "position 6: does not link to the one before it" in err


def test_deleted_middle_event_is_detected(chain: list[AuditEvent]) -> None:
    assert _sql(f"DELETE FROM {TABLE} WHERE id = %s", [chain[4].pk]) == 1
    err = _verify_fails()
    assert "position 5" in err and "removed" in err


def test_deleted_middle_link_is_detected(chain: list[AuditEvent]) -> None:
    """The event is still there but out of the chain; sealing it again cannot close the gap."""
    assert _sql(f"DELETE FROM {LINKS} WHERE seq = %s", [5]) == 1
    err = _verify_fails()
    assert "positions 5..5 are missing" in err


def test_deleted_middle_link_is_detected_without_sealing(chain: list[AuditEvent]) -> None:
    assert _sql(f"DELETE FROM {LINKS} WHERE seq = %s", [5]) == 1
    assert "positions 5..5 are missing" in _verify_fails("--no-seal")


def test_deleted_first_row_is_detected(chain: list[AuditEvent]) -> None:
    assert _sql(f"DELETE FROM {TABLE} WHERE id = %s", [chain[0].pk]) == 1
    _sql(f"DELETE FROM {LINKS} WHERE seq = %s", [1])
    assert "positions 1..1 are missing" in _verify_fails()


def test_removed_newest_event_and_link_are_detected(chain: list[AuditEvent]) -> None:
    assert _sql(f"DELETE FROM {TABLE} WHERE id = %s", [chain[9].pk]) == 1
    assert _sql(f"DELETE FROM {LINKS} WHERE seq = %s", [10]) == 1
    err = _verify_fails()
    assert "newest" in err


@pytest.mark.parametrize("seal", [True, False])
def test_removed_newest_link_is_detected(chain: list[AuditEvent], seal: bool) -> None:
    assert _sql(f"DELETE FROM {LINKS} WHERE seq = %s", [10]) == 1
    err = _verify_fails() if seal else _verify_fails("--no-seal")
    assert "10" in err


def test_removed_newest_rows_via_queryset_delete_are_detected(chain: list[AuditEvent]) -> None:
    AuditLink.objects.filter(seq__gte=8).delete()  # a bulk delete bypasses the model's delete()
    AuditEvent.objects.filter(pk__in=[r.pk for r in chain[7:]]).delete()
    assert "newest" in _verify_fails()


def test_wiped_log_is_detected(chain: list[AuditEvent]) -> None:
    _sql(f"DELETE FROM {LINKS}", [])
    _sql(f"DELETE FROM {TABLE}", [])
    _verify_fails()


def test_renumbered_links_are_detected(chain: list[AuditEvent]) -> None:
    """Deleting a link and its event and shifting the later links down to close the gap still breaks the chain."""
    _sql(f"DELETE FROM {LINKS} WHERE seq = %s", [5])
    _sql(f"DELETE FROM {TABLE} WHERE id = %s", [chain[4].pk])
    for seq in range(6, 11):
        _sql(f"UPDATE {LINKS} SET seq = %s WHERE seq = %s", [seq - 1, seq])
    AuditHead.objects.filter(pk=1).update(seq=9)
    _verify_fails()


def test_appending_after_a_verified_chain_keeps_it_intact(chain: list[AuditEvent]) -> None:
    verified()
    audit_record(event="grant.revoked", actor="user:1", detail={"reason": "revoked_by_user"})
    assert "11 events" in verified()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the trigger exists on PostgreSQL only")
@pytest.mark.parametrize(
    "statement",
    [
        f"UPDATE {TABLE} SET outcome = 'ok'",
        f"DELETE FROM {TABLE}",
        f"UPDATE {LINKS} SET hash = 'x'",
        f"DELETE FROM {LINKS}",
    ],
)
def test_the_application_role_cannot_edit_or_delete_audit_rows(db: None, statement: str) -> None:
    from django.db import DatabaseError, transaction

    audit_record(event="token.issued", actor="agent:x")
    audit_seal_all()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        _sql(statement, [])
    assert AuditEvent.objects.count() == 1 and AuditLink.objects.count() == 1

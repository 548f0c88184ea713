"""The append-only, hash-chained audit log and ``manage.py audit_verify``.

Tampering is done the way someone with database superuser access would do it:
on PostgreSQL a trigger refuses UPDATE and DELETE to the application, so the
tamperer first switches triggers off for the session (``session_replication_role
= replica``), then edits with queryset ``.update()`` or raw SQL.
"""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from audit.models import AuditEvent, AuditHead
from audit.services import _event_hash, _hashed_fields, audit_record, audit_refusal

pytestmark = pytest.mark.django_db

TABLE = AuditEvent._meta.db_table


def _verify() -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("audit_verify", stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _verify_fails() -> str:
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("audit_verify", stdout=StringIO(), stderr=err)
    return err.getvalue()


def _tamperer_bypasses_the_trigger() -> None:
    if connection.vendor == "postgresql":
        _sql("SET session_replication_role = replica", [])


@pytest.fixture
def chain(db):
    """Ten events, a mix of successes and refusals."""
    rows = []
    for i in range(10):
        if i % 3 == 2:
            rows.append(audit_refusal(event="token.refused", error="invalid_client", actor="",
                                      client_id=f"client-{i}", detail={"reason": f"attempt {i}"}))
        else:
            rows.append(audit_record(event="token.issued", actor=f"agent:client-{i}", client_id=f"client-{i}",
                                     grant_id=f"grant-{i}", detail={"jti": f"jti-{i}", "scope": "catalog:read"}))
    _tamperer_bypasses_the_trigger()
    yield rows
    if connection.vendor == "postgresql":
        _sql("SET session_replication_role = origin", [])


def _sql(statement: str, params: list) -> int:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


# --- intact chains --------------------------------------------------------------------------------


def test_intact_chain_passes(chain):
    out, err = _verify()
    assert "intact" in out and "10 events" in out
    assert err == ""


def test_empty_log_passes(db):
    out, _ = _verify()
    assert "intact" in out


def test_chain_stays_intact_through_real_traffic_with_refusals(flow, scenario):
    """Consent, code exchange, refresh, reuse detection and refused requests all append cleanly."""
    body = flow.full()
    flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})  # reuse
    flow.token({"grant_type": "authorization_code", "code": "x"}, auth=("nobody", "nothing"))
    flow.introspect(body["access_token"], auth=("nobody", "nothing"))
    assert AuditEvent.objects.filter(outcome="refused").count() >= 3
    out, _ = _verify()
    assert "intact" in out


def test_rows_link_to_each_other_in_order(chain):
    rows = list(AuditEvent.objects.order_by("seq"))
    assert [r.seq for r in rows] == list(range(1, 11))
    assert rows[0].prev_hash == "0" * 64
    for before, after in zip(rows, rows[1:], strict=False):
        assert after.prev_hash == before.hash
    head = AuditHead.objects.get(pk=1)
    assert (head.seq, head.hash) == (rows[-1].seq, rows[-1].hash)


# --- the model refuses to change history ----------------------------------------------------------


def test_save_on_an_existing_row_is_refused(chain):
    row = AuditEvent.objects.get(seq=4)
    row.detail = {"reason": "nothing to see"}
    with pytest.raises(RuntimeError):
        row.save()
    assert AuditEvent.objects.get(seq=4).detail == chain[3].detail
    _verify()


def test_save_with_update_fields_is_refused_too(chain):
    row = AuditEvent.objects.get(seq=3)
    row.outcome = "ok"
    with pytest.raises(RuntimeError):
        row.save(update_fields=["outcome"])
    assert AuditEvent.objects.get(seq=3).outcome == "refused"


def test_delete_is_refused(chain):
    row = AuditEvent.objects.get(seq=5)
    with pytest.raises(RuntimeError):
        row.delete()
    assert AuditEvent.objects.filter(seq=5).exists()
    _verify()


# --- tampering is detected ------------------------------------------------------------------------


def test_row_edited_with_queryset_update_is_detected(chain):
    assert AuditEvent.objects.filter(seq=4).update(detail={"jti": "forged"}) == 1
    err = _verify_fails()
    assert "event 4" in err


def test_refusal_rewritten_as_success_with_raw_sql_is_detected(chain):
    assert chain[2].outcome == "refused"
    assert _sql(f"UPDATE {TABLE} SET outcome = %s, error = %s WHERE seq = %s", ["ok", "", 3]) == 1
    err = _verify_fails()
    assert "event 3" in err


@pytest.mark.parametrize("column, value", [
    ("event", "token.refreshed"),
    ("actor", "agent:someone-else"),
    ("client_id", "someone-else"),
    ("grant_id", "another-grant"),
    ("remote_addr", "10.0.0.1"),
])
def test_any_edited_column_is_detected(chain, column, value):
    assert _sql(f"UPDATE {TABLE} SET {column} = %s WHERE seq = %s", [value, 6]) == 1
    assert "event 6" in _verify_fails()


def test_edited_timestamp_is_detected(chain):
    from datetime import timedelta

    from django.db.models import F

    assert AuditEvent.objects.filter(seq=7).update(occurred_at=F("occurred_at") - timedelta(hours=1)) == 1
    assert "event 7" in _verify_fails()


def test_edited_row_with_its_own_hash_recomputed_breaks_the_next_link(chain):
    """An editor who also recomputes the edited row's hash is caught by the next row's prev_hash."""
    row = AuditEvent.objects.get(seq=5)
    row.detail = {"jti": "forged"}
    forged_hash = _event_hash(seq=row.seq, occurred_at=row.occurred_at.isoformat(),
                              fields=_hashed_fields(row), prev_hash=row.prev_hash)
    AuditEvent.objects.filter(seq=5).update(detail={"jti": "forged"}, hash=forged_hash)
    err = _verify_fails()
    assert "event 6" in err


def test_deleted_middle_row_is_detected(chain):
    assert _sql(f"DELETE FROM {TABLE} WHERE seq = %s", [5]) == 1
    err = _verify_fails()
    assert "5" in err


def test_deleted_first_row_is_detected(chain):
    assert _sql(f"DELETE FROM {TABLE} WHERE seq = %s", [1]) == 1
    _verify_fails()


def test_removed_newest_row_is_detected(chain):
    assert _sql(f"DELETE FROM {TABLE} WHERE seq = %s", [10]) == 1
    err = _verify_fails()
    assert "newest" in err or "10" in err


def test_removed_newest_rows_via_queryset_delete_are_detected(chain):
    AuditEvent.objects.filter(seq__gte=8).delete()  # a bulk delete bypasses the model's delete()
    _verify_fails()


def test_wiped_log_is_detected(chain):
    _sql(f"DELETE FROM {TABLE}", [])
    _verify_fails()


def test_renumbered_rows_are_detected(chain):
    """Deleting a row and shifting the later ones down to close the gap still breaks the chain."""
    _sql(f"DELETE FROM {TABLE} WHERE seq = %s", [5])
    for seq in range(6, 11):
        _sql(f"UPDATE {TABLE} SET seq = %s WHERE seq = %s", [seq - 1, seq])
    AuditHead.objects.filter(pk=1).update(seq=9)
    _verify_fails()


def test_appending_after_a_verified_chain_keeps_it_intact(chain):
    _verify()
    audit_record(event="grant.revoked", actor="user:1", detail={"reason": "revoked_by_user"})
    out, _ = _verify()
    assert "11 events" in out


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the trigger exists on PostgreSQL only")
@pytest.mark.parametrize("statement", [f"UPDATE {TABLE} SET outcome = 'ok'", f"DELETE FROM {TABLE}"])
def test_the_application_role_cannot_edit_or_delete_audit_rows(db, statement):
    from django.db import DatabaseError, transaction

    audit_record(event="token.issued", actor="agent:x")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        _sql(statement, [])
    assert AuditEvent.objects.count() == 1

"""Tampering with the signed ledger, as a database superuser would (triggers bypassed).

Each case is the attacker's best effort short of the signing key: where they can recompute
what is unkeyed (chain hashes, leaf hashes, tree nodes, the sealer's head) they do, and
``audit_verify`` must still fail, naming the first bad position. Checkpoints are signed every
three events, so the named range is narrow.
"""

import json
from collections.abc import Iterable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction

from audit.ledger import event_leaf
from audit.merkle import frontier_append, insert_nodes
from audit.models import AuditCheckpoint, AuditEvent, AuditHead, AuditLink
from audit.services import GENESIS, _link_hash, audit_record, audit_seal, audit_seal_all
from countersign.ledger import CHECKPOINT_TYP
from tests.conftest import OAuthFlow, Scenario

pytestmark = pytest.mark.django_db

AUDIT_TABLES = [
    "audit_auditevent",
    "audit_auditlink",
    "audit_auditnode",
    "audit_auditcheckpoint",
    "audit_audithead",
]


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail("tampering tests need PostgreSQL's triggers: set DATABASE_URL=postgres://...")


def _sql(statement: str, params: Iterable[Any] = ()) -> int:
    with connection.cursor() as cursor:
        cursor.execute(statement, list(params))
        count: int = cursor.rowcount
        return count


@pytest.fixture
def ledger(db: None) -> Iterator[list[AuditEvent]]:
    rows = [
        audit_record(event="token.issued", actor=f"agent:c{i}", client_id=f"c{i}", detail={"jti": f"j{i}"})
        for i in range(10)
    ]
    while audit_seal_all(limit=3):
        pass
    assert list(AuditCheckpoint.objects.values_list("tree_size", flat=True)) == [3, 6, 9, 10]
    _sql("SET session_replication_role = replica")  # the superuser switches the triggers off
    yield rows
    _sql("SET session_replication_role = origin")


def _fails(*args: str) -> str:
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("audit_verify", "--no-seal", *args, stdout=StringIO(), stderr=err)
    return err.getvalue()


def _first_line(err: str) -> str:
    return err.splitlines()[0]


def _rewrite(events: list[AuditEvent]) -> None:
    """Rebuild links, tree nodes and head for ``events`` in this order, every unkeyed hash recomputed."""
    _sql("DELETE FROM audit_auditlink")
    _sql("DELETE FROM audit_auditnode")
    frontier: list[bytes] = []
    links: list[AuditLink] = []
    prev, size = GENESIS, 0
    for seq, event in enumerate(events, start=1):
        digest = _link_hash(event, seq=seq, prev_hash=prev)
        leaf = event_leaf(event, seq)
        frontier, size, nodes = frontier_append(frontier, size, [leaf])
        insert_nodes(nodes)
        links.append(
            AuditLink(
                seq=seq,
                event_id=event.pk,
                prev_hash=prev,
                hash=digest,
                leaf=leaf.hex(),
                sealed_at=event.occurred_at,
            )
        )
        prev = digest
    AuditLink.objects.bulk_create(links)
    AuditHead.objects.filter(pk=1).update(seq=size, hash=prev, frontier=[h.hex() for h in frontier])


def _in_order() -> list[AuditEvent]:
    return [
        AuditEvent.objects.get(pk=pk)
        for pk in AuditLink.objects.order_by("seq").values_list("event_id", flat=True)
    ]


def test_an_intact_ledger_passes(ledger: list[AuditEvent]) -> None:
    out = StringIO()
    call_command("audit_verify", "--no-seal", stdout=out, stderr=StringIO())
    assert "intact: 10 events" in out.getvalue() and "checkpoint 10" in out.getvalue()


def test_reordered_events_are_detected_at_the_first_moved_position(ledger: list[AuditEvent]) -> None:
    a, b = AuditLink.objects.get(seq=4).event_id, AuditLink.objects.get(seq=5).event_id
    _sql("UPDATE audit_auditlink SET event_id = -1 WHERE seq = 4")
    _sql("UPDATE audit_auditlink SET event_id = %s WHERE seq = 5", [a])
    _sql("UPDATE audit_auditlink SET event_id = %s WHERE seq = 4", [b])
    assert _first_line(_fails()).startswith("position 4:")


def test_reordered_events_with_every_hash_recomputed_are_detected_by_the_signed_root(
    ledger: list[AuditEvent],
) -> None:
    events = _in_order()
    events[4], events[5] = events[5], events[4]  # positions 5 and 6
    _rewrite(events)
    err = _fails()
    assert _first_line(err) == (
        "position 4: checkpoint 6: the events at positions 4..6 do not hash to its signed "
        "root (changed, moved or inserted)"
    )


def test_an_edited_event_with_every_hash_recomputed_is_detected_by_the_signed_root(
    ledger: list[AuditEvent],
) -> None:
    _sql(
        "UPDATE audit_auditevent SET detail = %s WHERE id = %s", [json.dumps({"jti": "forged"}), ledger[7].pk]
    )
    _rewrite(_in_order())
    assert _first_line(_fails()).startswith("position 7: checkpoint 9: the events at positions 7..9")


def test_an_event_inserted_in_the_middle_with_every_hash_recomputed_is_detected(
    ledger: list[AuditEvent],
) -> None:
    forged = audit_record(event="approval.approved", actor="user:1", detail={"approval_id": "forged"})
    events = _in_order()
    _rewrite(events[:1] + [AuditEvent.objects.get(pk=forged.pk)] + events[1:])
    assert _first_line(_fails()).startswith("position 1: checkpoint 3: the events at positions 1..3")


def test_an_event_appended_with_every_hash_recomputed_is_signed_by_no_checkpoint(
    ledger: list[AuditEvent],
) -> None:
    forged = audit_record(event="approval.approved", actor="user:1", detail={"approval_id": "forged"})
    _rewrite(_in_order() + [AuditEvent.objects.get(pk=forged.pk)])
    assert "position 11: positions 11..11 are signed by no checkpoint" in _fails()
    _sql("SET session_replication_role = origin")
    result = audit_seal()
    assert result.linked == 0 and "11" in result.refused, "the sealer signed over the forged event"


def test_a_forged_checkpoint_over_a_rewritten_ledger_does_not_verify(ledger: list[AuditEvent]) -> None:
    _sql("UPDATE audit_auditevent SET outcome = 'refused' WHERE id = %s", [ledger[1].pk])
    _rewrite(_in_order())
    key = ec.generate_private_key(ec.SECP256R1())
    head = AuditHead.objects.get(pk=1)
    from audit.merkle import frontier_root

    root = frontier_root([bytes.fromhex(h) for h in head.frontier]).hex()
    real = AuditCheckpoint.objects.get(tree_size=10)
    forged = jwt.encode(
        {"iss": "http://127.0.0.1:8000", "iat": 1, "tree_size": 10, "root_hash": root, "prev": None},
        key,
        algorithm="ES256",
        headers={"kid": real.kid, "typ": CHECKPOINT_TYP},
    )
    _sql("DELETE FROM audit_auditcheckpoint")
    _sql(
        "INSERT INTO audit_auditcheckpoint (tree_size, root_hash, issued_at, kid, jws) VALUES (10, %s, now(), %s, %s)",
        [root, real.kid, forged],
    )
    assert "checkpoint 10: signature or claims do not verify" in _first_line(_fails())


def test_a_deleted_event_with_every_hash_recomputed_is_detected(ledger: list[AuditEvent]) -> None:
    events = _in_order()
    _sql("DELETE FROM audit_auditevent WHERE id = %s", [events[8].pk])
    _rewrite(events[:8] + events[9:])
    err = _fails()
    assert _first_line(err).startswith("position 7: checkpoint 9: the events at positions 7..9")
    assert "checkpoint 10 signs 10 events and the ledger holds 9" in err


def test_removed_newest_events_and_checkpoints_are_caught_by_a_checkpoint_kept_elsewhere(
    ledger: list[AuditEvent], tmp_path: Path
) -> None:
    kept = tmp_path / "kept.jsonl"
    call_command("audit_checkpoint", "--output", str(kept), stdout=StringIO())
    events = _in_order()
    _sql("DELETE FROM audit_auditevent WHERE id = ANY(%s)", [[e.pk for e in events[8:]]])
    _sql("DELETE FROM audit_auditcheckpoint WHERE tree_size > 6")
    _rewrite(events[:6])
    call_command("audit_verify", "--no-seal", stdout=StringIO(), stderr=StringIO())  # consistent on its own
    err = _fails("--checkpoint", str(kept))
    assert "position 7: the checkpoint kept elsewhere signs 10 events and the ledger holds 6" in err


@pytest.mark.parametrize("tables", [["audit_auditevent", "audit_audithead"], AUDIT_TABLES])
def test_truncate_is_caught_by_a_checkpoint_kept_elsewhere(
    ledger: list[AuditEvent], tables: list[str], tmp_path: Path
) -> None:
    kept = tmp_path / "kept.jsonl"
    call_command("audit_checkpoint", "--output", str(kept), stdout=StringIO())
    _sql(f"TRUNCATE {', '.join(tables)}")
    err = _fails("--checkpoint", str(kept))
    assert _first_line(err).startswith("position 1:")
    if tables == AUDIT_TABLES:  # nothing left in the database to compare with but the kept copy
        assert "the checkpoint kept elsewhere signs 10 events and the ledger holds 0" in err


def test_truncating_events_and_head_is_detected_without_a_kept_checkpoint(ledger: list[AuditEvent]) -> None:
    """The statement that used to leave "intact: 0 events"."""
    _sql("TRUNCATE audit_auditevent, audit_audithead")
    err = _fails()
    assert _first_line(err).startswith("position 1: its event (id ") and "was removed" in err
    _sql("SET session_replication_role = origin")
    assert "the newest checkpoint signs 10 events and the sealer's head says 0" in audit_seal().refused


def test_truncating_every_audit_table_is_detected_through_the_grants_it_leaves(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    flow.full()
    audit_seal_all()
    _sql("SET session_replication_role = replica")
    _sql(f"TRUNCATE {', '.join(AUDIT_TABLES)}")
    assert "session grant(s) have no consent.given event" in _fails()
    _sql("SET session_replication_role = origin")


@pytest.mark.parametrize("table", AUDIT_TABLES)
def test_truncate_is_refused_by_the_database_even_for_the_tables_owner(
    ledger: list[AuditEvent], table: str
) -> None:
    _sql("SET session_replication_role = origin")
    _sql("SET countersign.audit_truncate = ''")  # what the application's sessions have
    with pytest.raises(DatabaseError, match="TRUNCATE"), transaction.atomic():
        _sql(f"TRUNCATE {table} CASCADE")
    assert AuditLink.objects.count() == 10 and AuditCheckpoint.objects.count() == 4


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_auditnode SET hash = repeat('0', 64)",
        "DELETE FROM audit_auditnode",
        "UPDATE audit_auditcheckpoint SET root_hash = repeat('0', 64)",
        "DELETE FROM audit_auditcheckpoint",
        "DELETE FROM audit_audithead",
    ],
)
def test_nodes_checkpoints_and_the_head_refuse_edits_and_deletes(
    ledger: list[AuditEvent], statement: str
) -> None:
    _sql("SET session_replication_role = origin")
    audit_record(event="token.issued", actor="agent:x")
    for _ in range(6):
        audit_record(event="token.issued", actor="agent:y")
    audit_seal_all()  # 17 events: one stored node (height 4)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        _sql(statement)


def test_a_removed_middle_checkpoint_breaks_the_checkpoint_chain(ledger: list[AuditEvent]) -> None:
    _sql("DELETE FROM audit_auditcheckpoint WHERE tree_size = 6")
    assert _first_line(_fails()).startswith(
        "position 4: checkpoint 9: does not follow the checkpoint before it"
    )


def test_an_edited_checkpoint_row_is_detected(ledger: list[AuditEvent]) -> None:
    _sql("UPDATE audit_auditcheckpoint SET root_hash = repeat('a', 64) WHERE tree_size = 3")
    assert _first_line(_fails()) == "position 1: checkpoint 3: its row does not match what it signs"


def test_an_edited_tree_node_is_detected(ledger: list[AuditEvent]) -> None:
    for i in range(6):
        audit_record(event="token.issued", actor=f"agent:more-{i}")
    _sql("SET session_replication_role = origin")
    audit_seal_all()
    _sql("SET session_replication_role = replica")
    assert _sql("UPDATE audit_auditnode SET hash = repeat('0', 64)") == 1
    assert "the stored tree node over positions 1..16 does not match the leaves under it" in _fails()


def test_an_edited_frontier_stops_the_sealer_and_is_reported(ledger: list[AuditEvent]) -> None:
    AuditHead.objects.filter(pk=1).update(frontier=["00" * 32, "11" * 32])
    assert "the sealer's frontier does not match the tree" in _fails()
    _sql("SET session_replication_role = origin")
    audit_record(event="token.issued", actor="agent:after")
    result = audit_seal()
    assert result.linked == 0 and result.refused

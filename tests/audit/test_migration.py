"""Events sealed before the ledger existed get their leaves, tree nodes and frontier from migration
0005, and the sealer's next run signs a first checkpoint over all of them."""

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.state import StateApps
from django.utils import timezone

from audit.services import GENESIS, _event_hash

pytestmark = pytest.mark.django_db(transaction=True)


def _migrate(target: list[tuple[str, str]]) -> StateApps:
    executor = MigrationExecutor(connection)
    executor.migrate(target)
    return executor.loader.project_state(target).apps


def test_a_chain_sealed_before_the_ledger_is_backfilled_and_signed() -> None:
    old = _migrate([("audit", "0004_sealed_links")])
    try:
        Event, Link, Head = (old.get_model("audit", m) for m in ("AuditEvent", "AuditLink", "AuditHead"))
        prev = GENESIS
        for seq in range(1, 21):  # more than one stored node's worth (16 leaves)
            event = Event.objects.create(
                occurred_at=timezone.now(),
                event="token.issued",
                outcome="ok",
                actor=f"agent:{seq}",
                detail={"seq": seq},
            )
            fields = {
                "event": event.event,
                "outcome": "ok",
                "actor": event.actor,
                "user_id": None,
                "client_id": "",
                "grant_id": "",
                "error": "",
                "detail": event.detail,
                "remote_addr": "",
            }
            digest = _event_hash(
                seq=seq, occurred_at=event.occurred_at.isoformat(), fields=fields, prev_hash=prev
            )
            Link.objects.create(
                seq=seq, event=event, prev_hash=prev, hash=digest, sealed_at=event.occurred_at
            )
            prev = digest
        Head.objects.create(pk=1, seq=20, hash=prev)
    finally:
        _migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
    from audit.models import AuditCheckpoint, AuditHead, AuditLink, AuditNode

    assert AuditLink.objects.exclude(leaf="").count() == 20 and AuditNode.objects.count() == 1
    assert len(AuditHead.objects.get(pk=1).frontier) == 2  # 16 + 4
    out = StringIO()
    call_command("audit_verify", stdout=out, stderr=StringIO())  # seals: signs the first checkpoint
    assert "intact: 20 events" in out.getvalue()
    assert list(AuditCheckpoint.objects.values_list("tree_size", flat=True)) == [20]

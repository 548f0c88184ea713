"""Writing to and checking the audit chain.

Appends are serialised by locking the single ``AuditHead`` row (``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite runs IMMEDIATE transactions, which take the write
lock first). A refusal must be recorded even though the refused operation rolls
back, so callers record refusals outside the refused operation's transaction.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import rfc8785
from django.db import transaction
from django.utils import timezone

from config.logging import bind

from .models import AuditEvent, AuditHead

GENESIS = "0" * 64


def _event_hash(*, seq: int, occurred_at: str, fields: dict[str, Any], prev_hash: str) -> str:
    body = {"seq": seq, "occurred_at": occurred_at, "prev_hash": prev_hash, **fields}
    return hashlib.sha256(rfc8785.dumps(body)).hexdigest()


def _hashed_fields(event: AuditEvent) -> dict[str, Any]:
    return {
        "event": event.event,
        "outcome": event.outcome,
        "actor": event.actor,
        "user_id": event.user_id,
        "client_id": event.client_id,
        "grant_id": event.grant_id,
        "error": event.error,
        "detail": event.detail,
        "remote_addr": event.remote_addr,
    }


def client_ip(request) -> str:
    if request is None:
        return ""
    meta = getattr(request, "META", None) or {}
    return str(meta.get("REMOTE_ADDR", ""))[:64]


def audit_record(
    *,
    event: str,
    outcome: str = AuditEvent.Outcome.OK,
    actor: str = "",
    user_id: int | None = None,
    client_id: str = "",
    grant_id: Any = "",
    error: str = "",
    detail: dict[str, Any] | None = None,
    request=None,
) -> AuditEvent:
    """Append one event to the chain. Never pass a secret or a whole token in ``detail``."""
    bind(user_id=user_id, client_id=client_id, grant_id=grant_id)
    # Inside a caller's transaction the event commits or rolls back with it: no savepoint needed.
    with transaction.atomic(savepoint=False):
        head, _ = AuditHead.objects.select_for_update().get_or_create(pk=1)
        occurred_at = timezone.now()
        row = AuditEvent(
            seq=head.seq + 1,
            occurred_at=occurred_at,
            event=event,
            outcome=outcome,
            actor=actor[:200],
            user_id=user_id,
            client_id=(client_id or "")[:100],
            grant_id=str(grant_id or ""),
            error=error,
            detail=detail or {},
            remote_addr=client_ip(request),
            prev_hash=head.hash,
        )
        row.hash = _event_hash(
            seq=row.seq, occurred_at=occurred_at.isoformat(), fields=_hashed_fields(row),
            prev_hash=head.hash,
        )
        row.save()
        AuditHead.objects.filter(pk=1).update(seq=row.seq, hash=row.hash)
    return row


def audit_refusal(*, event: str, error: str, **kwargs: Any) -> AuditEvent:
    return audit_record(event=event, outcome=AuditEvent.Outcome.REFUSED, error=error, **kwargs)


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    reason: str


def audit_chain_breaks() -> Iterator[ChainBreak]:
    """Walk the chain in order; yield every place where it does not hold."""
    prev_hash, expected_seq = GENESIS, 1
    for row in AuditEvent.objects.order_by("seq").iterator(chunk_size=2000):
        if row.seq != expected_seq:
            yield ChainBreak(expected_seq, f"events {expected_seq}..{row.seq - 1} are missing")
        if row.prev_hash != prev_hash:
            yield ChainBreak(row.seq, "does not link to the event before it")
        recomputed = _event_hash(
            seq=row.seq, occurred_at=row.occurred_at.isoformat(), fields=_hashed_fields(row),
            prev_hash=row.prev_hash,
        )
        if recomputed != row.hash:
            yield ChainBreak(row.seq, "content does not match its hash (edited)")
        prev_hash, expected_seq = row.hash, row.seq + 1
    head = AuditHead.objects.filter(pk=1).first()
    if head is not None and (head.seq != expected_seq - 1 or head.hash != prev_hash):
        yield ChainBreak(head.seq, "the newest events were removed (chain head does not match)")

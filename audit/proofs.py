"""Inclusion and consistency proofs (RFC 9162 §2.1.3, §2.1.4) against stored checkpoints.

A proof is a JSON document an auditor checks offline with ``countersign.ledger``: the event
(its leaf is recomputed from it), the audit path and the signed checkpoint, or two
checkpoints and the consistency path between them.
"""

from __future__ import annotations

from typing import Any

from countersign.ledger import CONSISTENCY_SCHEMA, INCLUSION_SCHEMA

from .ledger import checkpoint_document, event_document
from .merkle import StoredTree
from .models import AuditCheckpoint, AuditEvent, AuditLink


class ProofUnavailable(Exception):
    """No proof can be made for what was asked (the message says why)."""


def _checkpoint(tree_size: int | None) -> AuditCheckpoint:
    if tree_size is None:
        cp = AuditCheckpoint.objects.order_by("-tree_size").first()
        if cp is None:
            raise ProofUnavailable("no checkpoint has been signed yet")
        return cp
    cp = AuditCheckpoint.objects.filter(tree_size=tree_size).first()
    if cp is None:
        raise ProofUnavailable(f"there is no checkpoint of tree size {tree_size}")
    return cp


def inclusion_bundle(*, event_id: int, tree_size: int | None = None) -> dict[str, Any]:
    """The proof that event ``event_id`` is in the tree of checkpoint ``tree_size`` (default: the newest)."""
    link = AuditLink.objects.filter(event_id=event_id).first()
    event = AuditEvent.objects.filter(pk=event_id).first()
    if event is None:
        raise ProofUnavailable(f"there is no audit event {event_id}")
    if link is None:
        raise ProofUnavailable(f"event {event_id} is not sealed yet")
    cp = _checkpoint(tree_size)
    if cp.tree_size < link.seq:
        raise ProofUnavailable(f"event {event_id} (position {link.seq}) came after checkpoint {cp.tree_size}")
    path = StoredTree().inclusion(link.seq - 1, cp.tree_size)
    return {
        "schema": INCLUSION_SCHEMA,
        "event": event_document(event, seq=link.seq, leaf=link.leaf, sealed_at=link.sealed_at),
        "leaf_index": link.seq - 1,
        "tree_size": cp.tree_size,
        "inclusion_path": [h.hex() for h in path],
        "checkpoint": checkpoint_document(cp),
    }


def consistency_bundle(*, first: int, second: int | None = None) -> dict[str, Any]:
    """The proof that checkpoint ``second`` (default: the newest) extends checkpoint ``first``."""
    old, new = _checkpoint(first), _checkpoint(second)
    if old.tree_size > new.tree_size:
        raise ProofUnavailable("the first checkpoint must not be larger than the second")
    path = StoredTree().consistency(old.tree_size, new.tree_size) if old.tree_size < new.tree_size else []
    return {
        "schema": CONSISTENCY_SCHEMA,
        "first": checkpoint_document(old),
        "second": checkpoint_document(new),
        "consistency_path": [h.hex() for h in path],
    }


DECISIONS = ("approval.approved", "approval.auto_approved")


def approval_decision_event(*, approval_id: str, grant_id: str) -> int:
    """The id of the event that recorded an approval's approval (by the user, or by a rule)."""
    pk = (
        AuditEvent.objects.filter(event__in=DECISIONS, grant_id=grant_id, detail__approval_id=approval_id)
        .order_by("id")
        .values_list("pk", flat=True)
        .first()
    )
    if pk is None:
        raise ProofUnavailable(f"approval {approval_id} has no approval event")
    return pk

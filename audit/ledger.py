"""What the ledger signs: each event's leaf (RFC 9162 §2.1.1) and the checkpoints over the tree.

An event's leaf data is the RFC 8785 (JCS) form of its ``countersign.ledger.LEAF_FIELDS``,
its position (``seq``) included, so moving an event elsewhere changes its leaf. A checkpoint
is a compact JWS (RFC 7515) by the server's active signing key (``audit.keys.ledger_signer``,
``kid`` in the header, ``typ: checkpoint+jwt``) over ``iss``, ``iat``, ``tree_size``, ``root_hash`` and
``prev`` (the checkpoint before it, with the SHA-256 of its JWS), so checkpoints chain too and
anyone holding the JWKS can check one (``countersign.ledger.verify_checkpoint``).

Publishing: every checkpoint is served at ``/audit/checkpoints/``; a deployment can also have
each one appended to a file (``COUNTERSIGN["AUDIT_CHECKPOINT_FILE"]``) and POSTed to a witness
(``COUNTERSIGN["AUDIT_CHECKPOINT_WEBHOOK"]``, a Celery task queued on commit) so a copy lives
where whoever controls the database cannot reach it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import jwt
from django.db import transaction

from countersign.ledger import (
    CHECKPOINT_TYP,
    EVENT_SCHEMA,
    LedgerError,
    checkpoint_digest,
)
from countersign.rfc9162 import leaf_hash

from .conf import audit_settings
from .jcs import dumps as jcs_dumps
from .keys import ledger_signer
from .models import AuditCheckpoint, AuditEvent

log = logging.getLogger("audit.ledger")


def event_fields(event: AuditEvent) -> dict[str, Any]:
    """What an event says, as its chain link and its leaf both hash it."""
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


def event_entry(event: AuditEvent, seq: int) -> dict[str, Any]:
    """The members of an event that its leaf covers (``countersign.ledger.LEAF_FIELDS``)."""
    return {"seq": seq, "id": event.pk, "occurred_at": event.occurred_at.isoformat(), **event_fields(event)}


def event_leaf(event: AuditEvent, seq: int) -> bytes:
    """``countersign.ledger.event_leaf_hash`` of the event, with the sealer's fast JCS (``audit.jcs``)."""
    return leaf_hash(jcs_dumps(event_entry(event, seq)))


def event_document(event: AuditEvent, *, seq: int, leaf: str, sealed_at: datetime | None) -> dict[str, Any]:
    """An exported event (schema ``countersign.audit.v1``): its leaf members, its place in the tree
    (``leaf_index`` = ``seq - 1``) and the leaf hash the ledger holds for it."""
    return {
        "schema": EVENT_SCHEMA,
        **event_entry(event, seq),
        "leaf_index": seq - 1,
        "leaf_hash": leaf,
        "sealed_at": sealed_at.isoformat() if sealed_at else None,
    }


def checkpoint_sign(*, tree_size: int, root: bytes, prev: AuditCheckpoint | None) -> AuditCheckpoint:
    """One signature: a checkpoint over the tree of ``tree_size`` leaves with ``root``."""
    signer = ledger_signer()
    key = signer.active_key()
    now = time.time()
    claims = {
        "iss": signer.issuer(),
        "iat": int(now),
        "tree_size": tree_size,
        "root_hash": root.hex(),
        "prev": None
        if prev is None
        else {
            "tree_size": prev.tree_size,
            "root_hash": prev.root_hash,
            "digest": checkpoint_digest(prev.jws),
        },
    }
    jws = jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": CHECKPOINT_TYP}
    )
    return AuditCheckpoint(
        tree_size=tree_size,
        root_hash=root.hex(),
        kid=key.kid,
        jws=jws,
        issued_at=datetime.fromtimestamp(now, tz=UTC),
    )


def checkpoint_document(cp: AuditCheckpoint) -> dict[str, Any]:
    return {
        "tree_size": cp.tree_size,
        "root_hash": cp.root_hash,
        "issued_at": cp.issued_at.isoformat(),
        "kid": cp.kid,
        "jws": cp.jws,
    }


def server_jwks() -> dict[str, Any]:
    """Every key this server ever signed with, published or not: the server checks its own history.
    (An outside auditor uses the JWKS it kept, which is the point of keeping it.)"""
    return ledger_signer().jwks()


def checkpoint_from_document(document: Any) -> str:
    """The JWS of a checkpoint as the commands and endpoints print it, or as a bare JWS string."""
    if isinstance(document, str):
        return document.strip()
    jws = document.get("jws") if isinstance(document, dict) else None
    if isinstance(jws, str):
        return jws
    raise LedgerError("not a checkpoint document (a JSON object with a jws member, or a compact JWS)")


def checkpoint_published(cp: AuditCheckpoint) -> None:
    """Queue the copies that leave the database, once the checkpoint has committed."""
    document = checkpoint_document(cp)
    transaction.on_commit(lambda: _publish(document))


def _publish(document: dict[str, Any]) -> None:
    path = audit_settings.AUDIT_CHECKPOINT_FILE
    if path:
        try:
            append_checkpoint_file(path, document)
        except (
            OSError
        ) as exc:  # the checkpoint is in the database and served; say loudly that the copy failed
            log.error("audit ledger: could not append the checkpoint to %s: %s", path, exc)
    if audit_settings.AUDIT_CHECKPOINT_WEBHOOK:
        from .tasks import checkpoint_push

        try:
            checkpoint_push.delay(document["tree_size"])
        except Exception as exc:  # noqa: BLE001 - the broker is down: the next checkpoint carries the news
            log.error("audit ledger: could not queue the checkpoint push: %s", exc)


def append_checkpoint_file(path: str, document: dict[str, Any]) -> None:
    """One JSON line per checkpoint, flushed to disk before returning."""
    line = json.dumps(document, separators=(",", ":")) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def newest_in_file(path: str) -> dict[str, Any] | None:
    """A kept checkpoint: a file holding one JSON document (as ``audit_checkpoint`` prints it), or JSON
    lines (the ``AUDIT_CHECKPOINT_FILE`` sink's and ``--output``'s format), whose last line is the newest."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read()
    except FileNotFoundError:
        return None
    if size <= 65536:
        try:
            document = json.loads(tail)
            return document if isinstance(document, dict) else None
        except ValueError:
            pass
    lines = [line for line in tail.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        document = json.loads(lines[-1])
    except ValueError as exc:
        raise LedgerError(f"{path}: the last line is not JSON ({exc})") from None
    return document if isinstance(document, dict) else None

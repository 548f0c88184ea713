"""Handing checkpoints to an outside witness (``COUNTERSIGN["AUDIT_CHECKPOINT_WEBHOOK"]``).

Queued on commit by the sealer, one per checkpoint; takes the tree size, re-reads the row and
POSTs its JSON (``audit.ledger.checkpoint_document``). Safe to run twice: a witness keys
checkpoints by tree size, and the same checkpoint is the same bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from celery import Task, shared_task

from .conf import audit_settings
from .ledger import checkpoint_document
from .models import AuditCheckpoint

log = logging.getLogger(__name__)


def checkpoint_post(tree_size: int) -> bool:
    """POST one checkpoint to the witness; True when it answered 2xx (or there is nothing to send)."""
    url = audit_settings.AUDIT_CHECKPOINT_WEBHOOK
    cp = AuditCheckpoint.objects.filter(tree_size=tree_size).first()
    if not url or cp is None:
        return True
    response = httpx.post(url, json=checkpoint_document(cp), timeout=5.0, follow_redirects=False)
    return 200 <= response.status_code < 300


@shared_task(name="audit.checkpoint_push", bind=True, max_retries=8, ignore_result=True)
def checkpoint_push(self: Task[Any, Any], tree_size: int) -> None:
    try:
        delivered = checkpoint_post(tree_size)
    except httpx.HTTPError as exc:
        log.warning("audit checkpoint %s: witness unreachable: %s", tree_size, type(exc).__name__)
        delivered = False
    if not delivered:
        raise self.retry(countdown=min(2**self.request.retries, 60))

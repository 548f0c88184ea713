"""Celery tasks: carriers of news about approval rows. Each takes an id, re-reads the row,
and is safe to run twice (acks_late redelivery): the inbox keys prompts by id, so a second
delivery updates the same prompt instead of adding another. Each push is numbered in the user's
stream (``approvals.delivery``), so one the channel layer drops is re-read by the inbox from the
database; a push that fails outright raises, and the task retries."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Task, shared_task
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record

from .delivery import removal_message, send_to_user
from .models import ApprovalRequest
from .notify.inbox import prompt_sent_to_inbox
from .quorum import prompt_for, quorum_for, recipients
from .selectors import approval_for_push
from .services import (
    approval_expire,
    approval_mark_delivered,
    approvals_expire_due,
    approvals_undelivered,
    auth_req_id_for,
)

log = logging.getLogger(__name__)


def _backoff(task: Task[Any, Any]) -> int:
    """1, 2, 4 ... 30 seconds: a manual retry otherwise waits Celery's default 180 s, long after Redis is back."""
    retries: int = task.request.retries
    backoff: int = 2**retries
    return min(backoff, 30)


@shared_task(
    name="approvals.push_grant_changed",
    bind=True,
    max_retries=4,
    retry_backoff=True,
    retry_backoff_max=30,
    ignore_result=True,
)
def push_grant_changed(self: Task[Any, Any], grant_id: str, user_id: int) -> None:
    """Tell the user's open pages that a grant's story moved on (a reported use, its end): an open
    timeline re-reads itself. Only news: the database stays the record."""
    try:
        send_to_user(user_id, {"type": "grant.changed", "grant_id": grant_id})
    except Exception as exc:
        raise self.retry(exc=exc, countdown=_backoff(self)) from exc


@shared_task(
    name="approvals.deliver_prompt",
    bind=True,
    max_retries=8,
    retry_backoff=True,
    retry_backoff_max=30,
    ignore_result=True,
)
def deliver_prompt(
    self: Task[Any, Any], approval_id: str, pushed: bool = False, pushed_at: float | None = None
) -> None:
    """Push a new prompt to its inboxes, record the delivery, fan out to the other channels.

    ``pushed``: the process that created the request already pushed it to the user's inboxes at
    ``pushed_at`` (``approvals.services._deliver_after_commit``), so only the rest is done here;
    a prompt the user answered before this task ran was still delivered then, and is recorded so.
    """
    approval = approval_for_push(approval_id=approval_id)
    if approval is None:
        return
    at = datetime.fromtimestamp(pushed_at, UTC) if pushed and pushed_at is not None else None
    if not approval.is_pending:
        if pushed:
            approval_mark_delivered(approval=approval, channel="websocket", at=at)
        return
    # Every inbox that may answer it (two-person approval: each approver's own), each told where its
    # quorum stands for that person. A retry sends to all again: the inbox keys prompts by id.
    if not pushed:
        quorum = quorum_for(scope=approval.scope, details=approval.authorization_details)
        try:
            for user_id in recipients(approval, quorum):
                send_to_user(
                    user_id,
                    {
                        "type": "approval.upsert",
                        "prompt": prompt_for(approval, viewer_id=user_id, quorum=quorum),
                    },
                )
        except Exception as exc:  # Redis down: keep the row pending and try again
            raise self.retry(exc=exc, countdown=_backoff(self)) from exc
    first = approval_mark_delivered(approval=approval, channel="websocket", at=at)
    # The other channels (approvals.notify): devices, mailbox, organisation webhooks.
    prompt_sent_to_inbox(approval=approval, first=first)


@shared_task(
    name="approvals.push_removal",
    bind=True,
    max_retries=8,
    retry_backoff=True,
    retry_backoff_max=30,
    ignore_result=True,
)
def push_removal(self: Task[Any, Any], approval_id: str) -> None:
    approval = approval_for_push(approval_id=approval_id)
    if approval is None or approval.status == ApprovalRequest.Status.PENDING:
        return
    quorum = quorum_for(scope=approval.scope, details=approval.authorization_details)
    try:
        for user_id in recipients(approval, quorum):
            send_to_user(user_id, removal_message(approval_id, approval.status))
    except Exception as exc:
        raise self.retry(exc=exc, countdown=_backoff(self)) from exc


@shared_task(
    name="approvals.notify_agent",
    bind=True,
    max_retries=6,
    retry_backoff=2,
    retry_backoff_max=60,
    ignore_result=True,
)
def notify_agent(self: Task[Any, Any], approval_id: str) -> None:
    """CIBA Core §10.2 ping callback: tell the agent its result is ready to collect."""
    approval = ApprovalRequest.objects.select_related("agent").filter(pk=approval_id).first()
    if (
        approval is None
        or approval.notified_at is not None
        or approval.status == ApprovalRequest.Status.PENDING
    ):
        return
    endpoint = approval.agent.backchannel_client_notification_endpoint
    if not endpoint:
        return
    ApprovalRequest.objects.filter(pk=approval_id).update(notify_attempts=approval.notify_attempts + 1)
    try:
        response = httpx.post(
            endpoint,
            json={"auth_req_id": auth_req_id_for(approval.pk)},
            timeout=5.0,
            headers={"Authorization": f"Bearer {approval.client_notification_token}"},
            follow_redirects=False,
        )
        ok = 200 <= response.status_code < 300
        error = "" if ok else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        ok, error = False, f"{type(exc).__name__}: {exc}"[:300]
    # The outcome and its audit row land together.
    with transaction.atomic():
        if ok:
            ApprovalRequest.objects.filter(pk=approval_id, notified_at__isnull=True).update(
                notified_at=timezone.now(), notify_error=""
            )
        else:
            ApprovalRequest.objects.filter(pk=approval_id).update(notify_error=error)
        audit_record(
            event="approval.agent_notified",
            outcome="ok" if ok else "refused",
            error="" if ok else "delivery_failed",
            actor="system",
            user_id=approval.user_id,
            client_id=approval.agent.client_id,
            grant_id=approval.grant_id,
            detail={"approval_id": approval_id, "attempt": approval.notify_attempts + 1, "error": error},
        )
    if not ok:
        raise self.retry()


@shared_task(name="approvals.expire_approval", ignore_result=True)
def expire_approval(approval_id: str) -> None:
    """Expire one request whose window (or action token) has ended.

    Nothing schedules this per prompt any more (the sweep, ``expire_due``, does the work); it
    stays registered so that tasks already queued with an ETA still run.
    """
    approval_expire(approval_id=approval_id)


@shared_task(name="approvals.redeliver_undelivered", ignore_result=True)
def redeliver_undelivered() -> int:
    """Safety net: queue delivery again for pending prompts that never reached the browser."""
    ids = approvals_undelivered()
    for approval_id in ids:
        deliver_prompt.delay(str(approval_id))
    return len(ids)


@shared_task(name="approvals.expire_due", ignore_result=True)
def expire_due() -> int:
    """Safety net for expiries whose scheduled task was lost (worker or Redis restarted)."""
    return approvals_expire_due()

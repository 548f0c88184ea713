"""Celery tasks of the delivery channels. Each takes ids, re-reads the rows, stops when the prompt
is no longer pending, and is safe to run twice: an outcome already recorded is not sent again.

``prompt_fan_out`` fans a prompt out (``approvals.deliver_prompt`` calls it after its websocket
push, in the same run); each device, webhook and email then goes in its own task, so one slow or
failing channel never holds up the others.
"""

import smtplib
from typing import Any
from uuid import UUID

from celery import shared_task
from django.contrib.auth import get_user_model

from consent.conf import countersign_settings

from ..models import ApprovalRequest
from ..selectors import approval_for_push
from . import messages, webhooks
from .models import OrganisationWebhook, PromptDelivery, PushSubscription
from .services import (
    delivery_record,
    email_preference,
    fan_out_targets,
    push_delivered,
    push_subscription_expired,
    queue_after_commit,
    reached_somewhere,
)
from .webpush import push_send

Channel, Outcome = PromptDelivery.Channel, PromptDelivery.Outcome
MAX_RETRIES = 6


def _backoff(retries: int) -> int:
    """2, 4, 8 ... 60 seconds."""
    return int(min(2 ** (retries + 1), 60))


def _pending(approval_id: str) -> ApprovalRequest | None:
    approval = approval_for_push(approval_id=approval_id)
    return approval if approval is not None and approval.is_pending else None


def _recorded(approval_id: str, channel: str, target: str) -> bool:
    """Sent already (delivered, or failed for good): a second run of the task sends nothing."""
    return PromptDelivery.objects.filter(
        approval_id=UUID(approval_id),
        channel=channel,
        target=target,
        outcome__in=(Outcome.DELIVERED, Outcome.FAILED),
    ).exists()


def prompt_fan_out(*, approval: ApprovalRequest, reached: bool = False) -> int:
    """Queue a pending prompt to every device, webhook and (per the user's preference) the mailbox.

    ``reached``: an open inbox took the prompt already (recorded as delivered on the websocket
    channel), so the "unreachable" email fallback would find it reached and send nothing: it is not
    queued at all. Called by ``approvals.deliver_prompt`` on a prompt's first delivery.
    """
    approval_id = str(approval.pk)
    targets = fan_out_targets(user_id=approval.user_id)
    queued = 0
    if countersign_settings.PUSH_ENABLED:
        for device_id in targets.devices:
            queue_after_commit("approvals.push_prompt", approval_id, device_id)
            queued += 1
    for hook_id in targets.webhooks:
        queue_after_commit("approvals.webhook_prompt", approval_id, hook_id)
        queued += 1
    if targets.email == "always":
        queue_after_commit("approvals.email_prompt", approval_id)
        queued += 1
    elif targets.email == "unreachable" and not reached:
        queue_after_commit(
            "approvals.email_prompt", approval_id, countdown=countersign_settings.EMAIL_FALLBACK_DELAY_SECONDS
        )
        queued += 1
    return queued


@shared_task(name="approvals.notify_prompt", ignore_result=True)
def notify_prompt(approval_id: str) -> int:
    """The fan-out as a task of its own (``prompt_fan_out``). ``approvals.deliver_prompt`` fans out
    in its own run now; this stays registered so that tasks already queued still run."""
    approval = _pending(approval_id)
    return 0 if approval is None else prompt_fan_out(approval=approval)


@shared_task(name="approvals.push_prompt", bind=True, max_retries=MAX_RETRIES, ignore_result=True)
def push_prompt(self: Any, approval_id: str, device_id: str) -> None:
    """RFC 8030 §5: one push message to one device; 404/410 removes the device (§7.3), 429/5xx and
    network errors are retried with backoff, then recorded as failed."""
    approval = _pending(approval_id)
    device = (
        PushSubscription.objects.filter(pk=device_id, user_id=approval.user_id).first() if approval else None
    )
    if approval is None or device is None or _recorded(approval_id, Channel.PUSH, device_id):
        return
    ttl = max(0, int((approval.expires_at - approval.created).total_seconds()))
    outcome = push_send(subscription=device.info(), payload=messages.push_payload(approval), ttl=ttl)
    if outcome.delivered:
        push_delivered(subscription_id=device.pk)
        delivery_record(approval=approval, channel=Channel.PUSH, target=device_id, outcome=Outcome.DELIVERED)
        return
    if outcome.gone:
        push_subscription_expired(subscription_id=device.pk, approval=approval, status=outcome.error)
    elif outcome.retry and self.request.retries < self.max_retries:
        raise self.retry(countdown=_backoff(self.request.retries))
    delivery_record(
        approval=approval, channel=Channel.PUSH, target=device_id, outcome=Outcome.FAILED, error=outcome.error
    )


@shared_task(name="approvals.webhook_prompt", bind=True, max_retries=MAX_RETRIES, ignore_result=True)
def webhook_prompt(self: Any, approval_id: str, webhook_id: str) -> None:
    """Standard Webhooks: one signed message per prompt and webhook; the ``webhook-id`` stays the
    same on every retry."""
    approval = _pending(approval_id)
    hook = OrganisationWebhook.objects.filter(pk=webhook_id, active=True).first()
    if approval is None or hook is None or _recorded(approval_id, Channel.WEBHOOK, webhook_id):
        return
    body = webhooks.webhook_body(event_type="approval.requested", data=messages.webhook_data(approval))
    outcome = webhooks.webhook_send(
        url=hook.url, secret=hook.secret, msg_id=f"msg_{approval_id}_{webhook_id}", body=body
    )
    if outcome.delivered:
        delivery_record(
            approval=approval, channel=Channel.WEBHOOK, target=webhook_id, outcome=Outcome.DELIVERED
        )
        return
    if outcome.retry and self.request.retries < self.max_retries:
        raise self.retry(countdown=_backoff(self.request.retries))
    delivery_record(
        approval=approval,
        channel=Channel.WEBHOOK,
        target=webhook_id,
        outcome=Outcome.FAILED,
        error=outcome.error,
    )


@shared_task(name="approvals.email_prompt", bind=True, max_retries=MAX_RETRIES, ignore_result=True)
def email_prompt(self: Any, approval_id: str) -> None:
    """Mail the headline and the prompt's link, per the user's preference (``unreachable``: only
    when no device and no open inbox took the prompt by now)."""
    approval = _pending(approval_id)
    if approval is None or _recorded(approval_id, Channel.EMAIL, ""):
        return
    preference = email_preference(user_id=approval.user_id)
    if preference == "never" or (preference == "unreachable" and reached_somewhere(approval_id=approval_id)):
        return
    address = get_user_model().objects.filter(pk=approval.user_id).values_list("email", flat=True).first()
    if not address:
        delivery_record(
            approval=approval,
            channel=Channel.EMAIL,
            outcome=Outcome.FAILED,
            error="no email address on the account",
        )
        return
    try:
        messages.email_message(approval, address).send()
    except (smtplib.SMTPException, OSError) as exc:
        if self.request.retries < self.max_retries:
            raise self.retry(countdown=_backoff(self.request.retries)) from exc
        delivery_record(
            approval=approval, channel=Channel.EMAIL, outcome=Outcome.FAILED, error=type(exc).__name__
        )
        return
    delivery_record(approval=approval, channel=Channel.EMAIL, outcome=Outcome.DELIVERED)

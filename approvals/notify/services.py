"""Every write of the delivery channels: devices, preferences, webhooks, and what each channel did.

Refusals change nothing and leave one audit row. Each channel's outcome for a prompt is recorded
once (``PromptDelivery``'s unique constraint decides a task that runs twice) with its audit row in
the same transaction.
"""

import hashlib
from dataclasses import dataclass
from functools import cache
from typing import Any
from uuid import UUID

from celery import current_app
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import IntegrityError, connection, transaction
from django.http import HttpRequest
from django.utils import timezone

from audit.services import audit_record, audit_refusal
from consent import rows
from consent.conf import countersign_settings

from ..errors import DeviceNotFound, PushSubscriptionInvalid, PushSubscriptionTooLarge, TooManyDevices
from ..models import ApprovalRequest
from . import webhooks
from .models import NotificationPreference, OrganisationWebhook, PromptDelivery, PushSubscription
from .webpush import SubscriptionRejected, parse_subscription

User = AbstractBaseUser | AnonymousUser
Channel = PromptDelivery.Channel
Outcome = PromptDelivery.Outcome
VIA = {"push": Channel.PUSH, "email": Channel.EMAIL, "webhook": Channel.WEBHOOK}


def queue_after_commit(task: str, *args: str, **options: Any) -> None:
    """Queue the task registered as ``task`` once the transaction commits (as
    ``approvals.services._after_commit``, for tasks that take more than an approval id)."""
    queued = current_app.tasks[task]
    transaction.on_commit(lambda: queued.apply_async(args, **options), robust=True)


def _user_actor(user: Any) -> str:
    return f"user:{user.pk}"


# --- devices (RFC 8030 push subscriptions) ---------------------------------------------------------


def _refuse_subscription(user: Any, request: HttpRequest | None, error: str, reason: str) -> None:
    audit_refusal(
        event="push.subscribe_refused",
        error=error,
        actor=_user_actor(user),
        user_id=user.pk,
        request=request,
        detail={"reason": reason[:200]},
    )


def push_subscription_register(
    *, user: Any, body: bytes, label: str = "", request: HttpRequest | None = None
) -> tuple[PushSubscription, bool]:
    """Keep the browser's subscription (``PushSubscription.toJSON()``) for this user.

    The same endpoint again updates its keys (a browser re-subscribing) rather than adding a device.
    Refusals are audited outside the transaction, so their row stays while nothing else is written.
    """
    if len(body) > countersign_settings.PUSH_SUBSCRIPTION_MAX_BYTES:
        _refuse_subscription(user, request, PushSubscriptionTooLarge.code, f"{len(body)} bytes")
        raise PushSubscriptionTooLarge("the subscription is too large", audited=True)
    try:
        parsed = parse_subscription(body)
    except SubscriptionRejected as exc:
        _refuse_subscription(user, request, PushSubscriptionInvalid.code, str(exc))
        raise PushSubscriptionInvalid(str(exc), audited=True) from exc
    endpoint_hash = hashlib.sha256(parsed.endpoint.encode()).hexdigest()
    with transaction.atomic():
        mine = PushSubscription.objects.select_for_update().filter(user=user)
        existing = mine.filter(endpoint_hash=endpoint_hash).first()
        if existing is not None:
            existing.p256dh, existing.auth = parsed.p256dh, parsed.auth
            existing.label = label[:80] or existing.label
            existing.save(update_fields=["p256dh", "auth", "label"])
            return existing, False
        if (
            len(mine) < countersign_settings.PUSH_MAX_DEVICES_PER_USER
        ):  # the user's rows locked: no race past it
            try:
                with transaction.atomic():
                    device = PushSubscription.objects.create(
                        user=user,
                        endpoint=parsed.endpoint,
                        endpoint_hash=endpoint_hash,
                        p256dh=parsed.p256dh,
                        auth=parsed.auth,
                        label=label[:80],
                    )
            except IntegrityError:  # the same browser, twice at once
                return PushSubscription.objects.get(user=user, endpoint_hash=endpoint_hash), False
            audit_record(
                event="push.subscribed",
                actor=_user_actor(user),
                user_id=user.pk,
                request=request,
                detail={"device_id": str(device.pk), "label": device.label},
            )
            return device, True
    _refuse_subscription(user, request, TooManyDevices.code, "device limit reached")
    raise TooManyDevices("you have too many devices; remove one first", audited=True)


def push_subscription_remove(*, user: Any, device_id: Any, request: HttpRequest | None = None) -> None:
    """The user removes one of their own devices; any other id is refused (404) and audited."""
    try:
        pk: UUID | None = UUID(str(device_id))
    except ValueError:
        pk = None
    with transaction.atomic():
        removed = PushSubscription.objects.filter(pk=pk, user=user).delete()[0] if pk else 0
        if removed == 1:
            audit_record(
                event="push.unsubscribed",
                actor=_user_actor(user),
                user_id=user.pk,
                request=request,
                detail={"device_id": str(pk)},
            )
            return
    audit_refusal(
        event="push.remove_refused",
        error=DeviceNotFound.code,
        actor=_user_actor(user),
        user_id=user.pk,
        request=request,
        detail={"device_id": str(device_id)[:64]},
    )
    raise DeviceNotFound("no such device", audited=True)


def push_subscription_expired(*, subscription_id: Any, approval: ApprovalRequest, status: str) -> bool:
    """RFC 8030 §7.3: the push service says the subscription is gone (404/410): forget it (audited)."""
    with transaction.atomic():
        removed = PushSubscription.objects.filter(pk=subscription_id).delete()[0]
        if removed:
            audit_record(
                event="push.device_expired",
                actor="system",
                user_id=approval.user_id,
                client_id=approval.agent.client_id,
                grant_id=approval.grant_id,
                detail={"device_id": str(subscription_id), "approval_id": str(approval.pk), "error": status},
            )
    return bool(removed)


# --- the email preference ------------------------------------------------------------------------


def email_preference(*, user_id: int) -> str:
    chosen = NotificationPreference.objects.filter(user_id=user_id).values_list("email", flat=True).first()
    return chosen or countersign_settings.EMAIL_DEFAULT_PREFERENCE


def email_preference_set(
    *, user: Any, email: str, request: HttpRequest | None = None
) -> NotificationPreference:
    if email not in NotificationPreference.Email.values:
        audit_refusal(
            event="notify.preference_refused",
            error="invalid_request",
            actor=_user_actor(user),
            user_id=user.pk,
            request=request,
            detail={"email": email[:20]},
        )
        raise PushSubscriptionInvalid("choose one of the offered email preferences", audited=True)
    with transaction.atomic():
        pref, _ = NotificationPreference.objects.update_or_create(
            user=user, defaults={"email": email, "updated": timezone.now()}
        )
        audit_record(
            event="notify.preference_set",
            actor=_user_actor(user),
            user_id=user.pk,
            request=request,
            detail={"email": email},
        )
    return pref


# --- organisation webhooks ---------------------------------------------------------------------------


def organisation_webhook_create(
    *, name: str, url: str, group: Any = None, actor: str = "admin"
) -> tuple[OrganisationWebhook, str]:
    """A webhook and its ``whsec_`` secret (shown once to the admin who made it)."""
    secret = webhooks.webhook_secret_new()
    with transaction.atomic():
        hook = OrganisationWebhook.objects.create(name=name, url=url, secret=secret, group=group)
        audit_record(
            event="notify.webhook_created",
            actor=actor,
            detail={
                "webhook_id": hook.pk,
                "name": name,
                "url": url[:200],
                "group": group.name if group is not None else "",
            },
        )
    return hook, secret


@dataclass(frozen=True)
class FanOutTargets:
    """Where a user's prompt goes besides the inbox: device ids, webhook ids, the email preference."""

    devices: list[str]
    webhooks: list[str]
    email: str


@cache
def _fan_out_sql() -> str:
    quote = connection.ops.quote_name
    devices, hooks, prefs = (
        quote(m._meta.db_table) for m in (PushSubscription, OrganisationWebhook, NotificationPreference)
    )
    members = quote(get_user_model().groups.through._meta.db_table)
    return (
        f"SELECT 'd', CAST(id AS text) FROM {devices} WHERE user_id = %s"
        f" UNION ALL SELECT 'w', CAST(h.id AS text) FROM {hooks} h WHERE h.active"
        f" AND (h.group_id IS NULL OR h.group_id IN (SELECT m.group_id FROM {members} m WHERE m.user_id = %s))"
        f" UNION ALL SELECT 'e', email FROM {prefs} WHERE user_id = %s"
    )


def fan_out_targets(*, user_id: int) -> FanOutTargets:
    """The user's devices, the organisation webhooks that reach them (every member's, and their
    groups') and their email preference, in one statement: a prompt's fan-out reads it per prompt."""
    with connection.cursor() as cursor:
        cursor.execute(_fan_out_sql(), [user_id, user_id, user_id])
        found = cursor.fetchall()
    email = next((value for kind, value in found if kind == "e"), "")
    # Ids as the models spell them (SQLite keeps UUIDs as bare hex).
    device_id, hook_id = PushSubscription._meta.pk.to_python, OrganisationWebhook._meta.pk.to_python
    return FanOutTargets(
        devices=[str(device_id(value)) for kind, value in found if kind == "d"],
        webhooks=[str(hook_id(value)) for kind, value in found if kind == "w"],
        email=email or countersign_settings.EMAIL_DEFAULT_PREFERENCE,
    )


# --- what each channel did -------------------------------------------------------------------------


def delivery_record(
    *,
    approval: ApprovalRequest,
    channel: str,
    outcome: str,
    target: str = "",
    error: str = "",
    audit: bool = True,
) -> bool:
    """Record one outcome of one channel for a prompt, once, with its audit row. True if new.

    ``audit=False`` where an audit row of its own tells it already (an open inbox's delivery:
    ``approval.delivered``): then one statement, ``INSERT ... ON CONFLICT DO NOTHING``, decides
    whether this is the first record; with its audit row, the two commit together."""
    values = {
        "approval": approval.pk,
        "channel": channel,
        "target": target[:64],
        "outcome": outcome,
        "error": error[:200],
        "at": timezone.now(),
    }
    if not audit:
        return rows.insert(PromptDelivery, values, skip_conflicts=True) is not None
    with transaction.atomic():
        if rows.insert(PromptDelivery, values, skip_conflicts=True) is None:
            return False
        event = {
            Outcome.DELIVERED: "approval.reached",
            Outcome.FAILED: "approval.not_reached",
            Outcome.CLICKED: "approval.opened",
        }[Outcome(outcome)]
        audit_record(
            event=event,
            outcome="refused" if outcome == Outcome.FAILED else "ok",
            error="delivery_failed" if outcome == Outcome.FAILED else "",
            actor="system" if outcome != Outcome.CLICKED else f"user:{approval.user_id}",
            user_id=approval.user_id,
            client_id=approval.agent.client_id,
            grant_id=approval.grant_id,
            detail={
                "approval_id": str(approval.pk),
                "channel": channel,
                "target": target[:64],
                "error": error[:200],
            },
        )
    return True


def prompt_opened(*, approval: ApprovalRequest, via: str) -> bool:
    """The user opened the prompt from a notification or a mail link (``?via=``): recorded once."""
    channel = VIA.get(via)
    if channel is None:
        return False
    return delivery_record(approval=approval, channel=channel, outcome=Outcome.CLICKED)


def reached_somewhere(*, approval_id: Any) -> bool:
    """Whether a device or an open inbox took the prompt (the "unreachable" email preference)."""
    return PromptDelivery.objects.filter(
        approval_id=approval_id,
        channel__in=(Channel.PUSH, Channel.WEBSOCKET),
        outcome__in=(Outcome.DELIVERED, Outcome.CLICKED),
    ).exists()


def push_delivered(*, subscription_id: Any) -> None:
    PushSubscription.objects.filter(pk=subscription_id).update(last_delivered_at=timezone.now())

"""Where a user's prompts may go beyond an open inbox, and what happened on each channel.

``PushSubscription``: one browser (RFC 8030 push subscription with the RFC 8291 keys).
``NotificationPreference``: when to email. ``OrganisationWebhook``: an admin's signed endpoint
(Standard Webhooks) for the prompts of an organisation (a Django group, or everyone).
``PromptDelivery``: one outcome (delivered, failed, clicked) of one channel for one prompt.
``VapidKey``: the server's application-server key pair (RFC 8292), kept like the signing keys.
"""

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class VapidKey(models.Model):
    """The P-256 key pair that signs VAPID JWTs (RFC 8292 §2); one is active."""

    private_pem = models.TextField()
    public_key = models.CharField(
        max_length=100, help_text="Uncompressed P-256 point, base64url (RFC 8292 §3.2)."
    )
    created = models.DateTimeField(default=timezone.now)
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = "VAPID key"
        constraints = [
            models.UniqueConstraint(
                fields=["active"], condition=models.Q(active=True), name="one_active_vapid_key"
            )
        ]

    def __str__(self) -> str:
        return f"VAPID key {self.public_key[:12]}… ({'active' if self.active else 'retired'})"


class PushSubscription(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="push_subscriptions"
    )
    endpoint = models.URLField(max_length=1024)
    endpoint_hash = models.CharField(max_length=64, editable=False)
    p256dh = models.CharField(max_length=100, help_text="The browser's ECDH public key (RFC 8291 §3.1).")
    auth = models.CharField(max_length=32, help_text="The 16-byte authentication secret (RFC 8291 §3.2).")
    label = models.CharField(max_length=80, blank=True, help_text="What the browser said it is.")
    created = models.DateTimeField(default=timezone.now)
    last_delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created"]
        verbose_name = "push device"
        constraints = [
            models.UniqueConstraint(fields=["user", "endpoint_hash"], name="one_subscription_per_endpoint")
        ]

    def __str__(self) -> str:
        return f"{self.label or 'browser'} of {self.user_id}"

    def info(self) -> dict[str, object]:
        """The subscription as the browser's PushSubscription.toJSON() gives it (pywebpush's input)."""
        return {"endpoint": self.endpoint, "keys": {"p256dh": self.p256dh, "auth": self.auth}}


class NotificationPreference(models.Model):
    class Email(models.TextChoices):
        UNREACHABLE = "unreachable", "Email me when none of my devices or open inboxes is reachable"
        ALWAYS = "always", "Always email me too"
        NEVER = "never", "Never email me"

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_preference"
    )
    email = models.CharField(max_length=16, choices=Email.choices, default=Email.UNREACHABLE)
    updated = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"email {self.email} for {self.user_id}"


class OrganisationWebhook(models.Model):
    """An admin's endpoint told of every prompt of its organisation's users; it can never decide one."""

    name = models.CharField(max_length=100, unique=True)
    url = models.URLField(max_length=500)
    secret = models.CharField(
        max_length=100, editable=False, help_text="whsec_ + base64 (Standard Webhooks)."
    )
    group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        help_text="The organisation: members of this group. Empty: every user.",
    )
    active = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        verbose_name = "organisation webhook"

    def __str__(self) -> str:
        return self.name


class PromptDelivery(models.Model):
    class Channel(models.TextChoices):
        WEBSOCKET = "websocket", "open inbox"
        PUSH = "push", "device notification"
        EMAIL = "email", "email"
        WEBHOOK = "webhook", "organisation webhook"

    class Outcome(models.TextChoices):
        DELIVERED = "delivered", "delivered"
        FAILED = "failed", "failed"
        CLICKED = "clicked", "opened"

    approval = models.ForeignKey(
        "approvals.ApprovalRequest", on_delete=models.CASCADE, related_name="deliveries"
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    target = models.CharField(
        max_length=64, blank=True, help_text="Which device or webhook (its id); empty for one per channel."
    )
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    error = models.CharField(max_length=200, blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]
        verbose_name = "prompt delivery"
        verbose_name_plural = "prompt deliveries"
        # Each outcome of each target is recorded once: a task that runs twice records nothing new.
        constraints = [
            models.UniqueConstraint(
                fields=["approval", "channel", "target", "outcome"], name="one_outcome_per_channel_target"
            )
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.outcome} for {self.approval_id}"

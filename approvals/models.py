"""Approval requests (one sensitive action each) and the one-shot action tokens they mint.

State machine (DESIGN.md); every transition is one guarded service function in
``approvals.services`` whose conditional UPDATE decides races::

    PENDING --approve--> APPROVED --token collected--> ISSUED --redeem--> REDEEMED
    PENDING --deny-----> DENIED
    PENDING --timeout--> EXPIRED                 (approval window passed)
    PENDING/APPROVED/ISSUED --grant revoked, agent suspended, agent cancels--> CANCELLED
    ISSUED  --action token expired unredeemed--> EXPIRED

Terminal states (DENIED, EXPIRED, CANCELLED, REDEEMED) never change.
"""

import json
import uuid
from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils import timezone

from consent.conf import countersign_settings


def _ciba_interval() -> int:
    """CIBA Core §7.3: the poll interval a new request starts with (``COUNTERSIGN["CIBA_INTERVAL"]``)."""
    interval: int = countersign_settings.CIBA_INTERVAL
    return interval


class ApprovalRequest(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Waiting for you"
        APPROVED = "approved", "Approved"
        ISSUED = "issued", "Approved, token collected"
        REDEEMED = "redeemed", "Approved and carried out"
        DENIED = "denied", "Denied"
        EXPIRED = "expired", "Expired"
        CANCELLED = "cancelled", "Cancelled"

    class DeliveryMode(models.TextChoices):
        POLL = "poll", "Poll"
        PING = "ping", "Ping"

    # Set on the instances a page shows, for its template (approvals.views); never stored.
    gives: str
    status_words: str
    how: str
    # Set on the instance a redemption returns: when its action token was redeemed (approvals.redemption).
    redeemed_at: datetime

    TERMINAL = (Status.REDEEMED, Status.DENIED, Status.EXPIRED, Status.CANCELLED)
    OPEN = (Status.PENDING, Status.APPROVED, Status.ISSUED)

    # The state graph of the module docstring, as data: edge -> (states it leaves, state it enters).
    # Every transition in approvals.services takes its guard from here (``leaving``), and the
    # table-driven test checks its cases against it, so the graph is written once.
    EDGES = {
        "approve": ((Status.PENDING,), Status.APPROVED),  # the user, or an auto-approve rule
        "deny": ((Status.PENDING,), Status.DENIED),
        "collect": ((Status.APPROVED,), Status.ISSUED),  # the agent collects its action token
        "redeem": ((Status.ISSUED,), Status.REDEEMED),
        "expire": ((Status.PENDING, Status.ISSUED), Status.EXPIRED),  # window passed; token lapsed
        "cancel": (OPEN, Status.CANCELLED),  # grant ended, agent suspended, agent cancelled
    }

    @classmethod
    def leaving(cls, edge: str) -> tuple[str, ...]:
        """The states ``edge`` may leave (the guard of its conditional UPDATE)."""
        return cls.EDGES[edge][0]

    @classmethod
    def entering(cls, edge: str) -> str:
        return cls.EDGES[edge][1]

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Unique through Meta.constraints: a unique field on PostgreSQL also gets a LIKE index nothing uses.
    auth_req_id_hash = models.CharField(max_length=64, editable=False)
    grant = models.ForeignKey("consent.SessionGrant", on_delete=models.CASCADE, related_name="approvals")
    # user and agent are the first columns of the Meta.indexes below: no index of their own.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="approvals", db_index=False
    )
    agent = models.ForeignKey(
        settings.OAUTH2_PROVIDER_APPLICATION_MODEL,
        on_delete=models.CASCADE,
        related_name="approvals",
        db_index=False,
    )
    scope = models.CharField(max_length=100)
    authorization_details = models.JSONField(help_text="RFC 9396 array, exactly as the agent sent it.")
    action_hash = models.CharField(max_length=64)
    headline = models.CharField(
        max_length=300, help_text="Rendered by the server from authorization_details."
    )
    binding_message = models.CharField(max_length=200, blank=True, help_text="The agent's own note.")
    instance = models.CharField(
        max_length=64,
        blank=True,
        default="",
        help_text="The agent instance that asked (act.instance); only it collects.",
    )
    delivery_mode = models.CharField(max_length=8, choices=DeliveryMode.choices, default=DeliveryMode.POLL)
    client_notification_token = models.CharField(max_length=1024, blank=True, editable=False)
    interval = models.PositiveIntegerField(default=_ciba_interval)
    created = models.DateTimeField(default=timezone.now, db_index=True)
    expires_at = models.DateTimeField(db_index=True)
    last_polled_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decision_method = models.CharField(
        max_length=32, blank=True, help_text="browser, auto_rule, grant_revoked, agent_suspended, ..."
    )
    decision_auth = models.JSONField(
        default=dict, blank=True, help_text="auth_time/amr/acr of the deciding user, or the rule."
    )
    delivered_at = models.DateTimeField(null=True, blank=True, help_text="First push to the user's browser.")
    notified_at = models.DateTimeField(
        null=True, blank=True, help_text="Ping-mode notice accepted by the agent."
    )
    notify_attempts = models.PositiveSmallIntegerField(default=0)
    notify_error = models.CharField(max_length=300, blank=True)
    opened_by = models.ForeignKey(
        "consent.ResourceServer",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        help_text="Opened by this resource server for a token it was handed (approvals.rs_stepup): only it "
        "collects the action token, never the agent.",
    )
    budget_note = models.CharField(
        max_length=200, blank=True, help_text="Why the user's budget did not cover it, shown on the prompt."
    )

    class Meta:
        ordering = ["-created"]
        verbose_name = "approval request"
        # Every index is written again by each status change (status is indexed, so no update of a
        # request is HOT): only those that a read uses, and none of the LIKE (varchar_pattern_ops)
        # twins Django adds to an indexed or unique CharField on PostgreSQL.
        indexes = [
            models.Index(fields=["status"], name="approval_status"),
            models.Index(fields=["action_hash"], name="approval_action_hash"),
            models.Index(fields=["user", "status"]),
            models.Index(fields=["agent", "status"]),
            # the sliding-window prompt caps (approvals.services._pending_state)
            models.Index(fields=["user", "created"]),
            models.Index(fields=["agent", "created"]),
        ]
        constraints = [
            models.UniqueConstraint(fields=["auth_req_id_hash"], name="approval_auth_req_id_hash_key"),
            # Identical pending requests collapse into one prompt (approval fatigue), even under a race.
            models.UniqueConstraint(
                fields=["grant", "scope", "action_hash"],
                condition=models.Q(status="pending"),
                name="one_pending_prompt_per_action",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scope}: {self.headline} ({self.status})"

    @property
    def authorization_details_pretty(self) -> str:
        return json.dumps(self.authorization_details, indent=2, ensure_ascii=False)

    @property
    def is_pending(self) -> bool:
        return self.status == self.Status.PENDING and self.expires_at > timezone.now()


class ActionToken(models.Model):
    """One minted action token. ``redeemed_at`` is set once, by a conditional UPDATE."""

    jti = models.CharField(max_length=64)  # unique through Meta.constraints (no LIKE index)
    approval = models.OneToOneField(ApprovalRequest, on_delete=models.CASCADE, related_name="action_token")
    # SHA-256 of the token as minted (consent.tokens.token_checksum): redemption proves a token is this
    # one by it instead of by its signature (approvals.redemption). Empty for tokens minted before.
    token_checksum = models.CharField(max_length=64, blank=True, default="", editable=False)
    issued_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    redeemed_at = models.DateTimeField(null=True, blank=True)
    redeemed_by = models.ForeignKey(
        "consent.ResourceServer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["jti"], name="action_token_jti_key")]

    def __str__(self) -> str:
        return f"action token {self.jti} ({'redeemed' if self.redeemed_at else 'unredeemed'})"


class BudgetReservation(models.Model):
    """The amount one budget approval counts against its budget (``approvals.budgets``).

    ``state`` leaves ``reserved`` once: to ``spent`` when the action token is redeemed, to
    ``refunded`` when the request ends without redemption; each by a conditional UPDATE, so a
    refund that runs twice returns the amount once.
    """

    class State(models.TextChoices):
        RESERVED = "reserved", "Reserved"
        SPENT = "spent", "Spent"
        REFUNDED = "refunded", "Returned to the budget"

    approval = models.OneToOneField(
        ApprovalRequest, on_delete=models.CASCADE, related_name="budget_reservation"
    )
    budget = models.ForeignKey("consent.Budget", on_delete=models.CASCADE, related_name="reservations")
    amount = models.DecimalField(max_digits=18, decimal_places=4)
    currency = models.CharField(max_length=3)
    period_start = models.DateTimeField(help_text="The budget period the amount counted in.")
    state = models.CharField(max_length=10, choices=State.choices, default=State.RESERVED, db_index=True)
    created = models.DateTimeField(default=timezone.now)
    settled_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} for {self.approval_id} ({self.state})"


class ApprovalVote(models.Model):
    """One person's answer to a request a quorum decides (``approvals.votes``): written once, by
    that person, with their own sign-in (``auth``: ``auth_time``, ``amr``, ``acr``)."""

    class Decision(models.TextChoices):
        APPROVE = "approve", "Approved"
        DENY = "deny", "Denied"

    approval = models.ForeignKey(ApprovalRequest, on_delete=models.CASCADE, related_name="votes")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    decision = models.CharField(max_length=8, choices=Decision.choices)
    decided_at = models.DateTimeField(default=timezone.now)
    auth = models.JSONField(default=dict, blank=True, help_text="auth_time/amr/acr of the voter's sign-in.")

    class Meta:
        ordering = ["decided_at", "id"]
        constraints = [models.UniqueConstraint(fields=["approval", "user"], name="one_vote_per_approver")]

    def __str__(self) -> str:
        return f"{self.user_id} {self.decision} {self.approval_id}"


# The delivery channels' records (approvals.notify) belong to this app.
from .notify.models import (  # noqa: E402, F401
    NotificationPreference,
    OrganisationWebhook,
    PromptDelivery,
    PushSubscription,
    VapidKey,
)

"""The agent registry, scope policy, session grants, signing keys and DOT's token rows.

DOT's application, authorization-code, access-token and refresh-token models are
swapped for ours from the first migration, so every code and token row points at
the session grant (the consent event) it came from: revoking the grant makes all
of them inactive at once.
"""

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone
from oauth2_provider.models import (
    AbstractAccessToken,
    AbstractApplication,
    AbstractGrant,
    AbstractIDToken,
    AbstractRefreshToken,
)
from oauth2_provider.settings import oauth2_settings

from .budget import Budget as Budget  # a consent model, kept in its own module
from .budget import money
from .conf import countersign_settings
from .rules import validate_rule

# Model defaults read from COUNTERSIGN (consent.conf), so a setting and a new row's default never differ.


def _default_ttl() -> int:
    ttl: int = countersign_settings.DEFAULT_ACCESS_TOKEN_TTL
    return ttl


def _default_approval_window() -> int:
    window: int = countersign_settings.DEFAULT_APPROVAL_WINDOW
    return window


def _default_action_token_ttl() -> int:
    ttl: int = countersign_settings.DEFAULT_ACTION_TOKEN_TTL
    return ttl


class Agent(AbstractApplication):  # type: ignore[misc]  # django-oauth-toolkit ships no types
    """An AI agent registered as an OAuth client. Actor id in tokens: ``agent:<client_id>``."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        # Self-described agents in production: session scopes only, no step-up, until an admin activates.
        PENDING_REVIEW = "pending_review", "Pending review"
        SUSPENDED = "suspended", "Suspended"

    class Registration(models.TextChoices):
        ADMIN = "admin", "Registered by an administrator"
        METADATA_DOCUMENT = "metadata_document", "Self-described: Client ID Metadata Document"
        DYNAMIC = "dynamic", "Self-described: dynamic registration (RFC 7591)"

    class RefreshMode(models.TextChoices):
        ROTATING = "rotating", "Rotating refresh tokens"
        EXCHANGE = "exchange", "Token exchange only (no refresh token)"
        NONE = "none", "None (re-consent needed)"

    publisher = models.CharField(max_length=200, help_text="Who builds and answers for this agent.")
    description = models.TextField(blank=True, help_text="Shown to users on the consent screen.")
    status = models.CharField(
        max_length=16,
        choices=Status.choices,
        default=Status.ACTIVE,
        db_index=True,
        help_text="A suspended agent gets no tokens, and its existing tokens stop working.",
    )
    allowed_scopes = models.JSONField(
        default=list,
        blank=True,
        help_text="Every scope this agent may ever ask for (a list of scope-policy names).",
    )
    access_token_ttl = models.PositiveIntegerField(
        "access-token lifetime (seconds)",
        default=_default_ttl,
        validators=[MinValueValidator(30)],
    )
    max_grant_lifetime = models.PositiveIntegerField(
        "longest session grant (seconds)",
        default=7 * 24 * 3600,
        validators=[MinValueValidator(60)],
        help_text="Users pick a grant lifetime up to this on the consent screen.",
    )
    refresh_mode = models.CharField(
        max_length=16,
        choices=RefreshMode.choices,
        default=RefreshMode.ROTATING,
        help_text="How a workflow continues past one access token's lifetime.",
    )
    require_second_factor = models.BooleanField(
        default=False,
        help_text="Consent needs a password and a TOTP code.",
    )
    require_dpop = models.BooleanField(
        "require DPoP",
        default=False,
        help_text="Tokens only with a DPoP proof by one of the agent's registered keys (RFC 9449).",
    )
    jwks = models.JSONField(
        null=True,
        blank=True,
        help_text="Public keys (a JWK Set) for private_key_jwt and DPoP. Optional.",
    )
    delegates = models.JSONField(
        default=list,
        blank=True,
        help_text="Client ids of sub-agents this agent may hand work to (RFC 8693 delegation). "
        "Users see them on the consent screen.",
    )
    registration = models.CharField(
        max_length=24,
        choices=Registration.choices,
        default=Registration.ADMIN,
        db_index=True,
        help_text="How the agent joined. Self-described agents assert their own name and publisher.",
    )
    client_metadata = models.JSONField(
        null=True,
        blank=True,
        help_text="Self-described agents: the client metadata exactly as received.",
    )
    metadata_source = models.CharField(
        max_length=300,
        blank=True,
        help_text="Self-described agents: the document URL, or the address that registered it.",
    )
    metadata_expires_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Client ID Metadata Documents: when the cached document is fetched again.",
    )
    backchannel_client_notification_endpoint = models.URLField(
        "CIBA notification endpoint",
        blank=True,
        help_text="Where ping-mode approval notices are sent. Optional.",
    )

    class Meta(AbstractApplication.Meta):  # type: ignore[misc]  # django-oauth-toolkit ships no types
        swappable = "OAUTH2_PROVIDER_APPLICATION_MODEL"
        verbose_name = "agent"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.publisher})"

    @property
    def actor_id(self) -> str:
        return f"agent:{self.client_id}"

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE

    @property
    def may_sign_in(self) -> bool:
        """Active, or pending review (session scopes only): may authenticate and hold session tokens."""
        return self.status in (self.Status.ACTIVE, self.Status.PENDING_REVIEW)

    @property
    def is_self_described(self) -> bool:
        return self.registration != self.Registration.ADMIN

    @property
    def self_described_host(self) -> str:
        """The host a self-described agent's identity rests on (its document URL's, or its redirect URI's)."""
        from urllib.parse import urlsplit

        source = (
            self.client_id
            if self.registration == self.Registration.METADATA_DOCUMENT
            else ((self.redirect_uris or "").split() or [""])[0]
        )
        return urlsplit(source).hostname or ""

    def get_allowed_schemes(self) -> list[str]:
        """DOT's redirect URI schemes, plus http for a self-described native client whose http redirect
        URIs are all on a loopback address (RFC 8252 §7.3), also where the deployment allows https only."""
        from urllib.parse import urlsplit

        schemes = list(super().get_allowed_schemes())
        http = [u for u in (self.redirect_uris or "").split() if u.lower().startswith("http:")]
        if (
            self.is_self_described
            and "http" not in schemes
            and http
            and all(urlsplit(u).hostname in ("127.0.0.1", "::1") for u in http)
        ):
            schemes.append("http")
        return schemes

    def is_usable(self, request: object) -> bool:
        # DOT asks this whenever it loads a client: a suspended agent is no client at all.
        return self.may_sign_in


class ResourceServer(models.Model):
    """A downstream system, identified by its audience URI."""

    name = models.CharField(max_length=200)
    audience = models.CharField(
        max_length=500,
        unique=True,
        help_text="The URI that tokens for this system carry in aud.",
    )
    client_id = models.CharField(max_length=100, unique=True, db_index=True)
    client_secret = models.CharField(max_length=255, help_text="Stored hashed.")
    is_active = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} <{self.audience}>"


class ScopePolicy(models.Model):
    """What a scope means and whether it may ride on the blanket session grant."""

    class Sensitivity(models.TextChoices):
        STANDARD = "standard", "Standard (allowed for the session)"
        STEP_UP = "step_up", "Step-up (the user confirms each use)"

    name = models.CharField(max_length=100, unique=True)
    description = models.CharField(max_length=300, help_text="What users read on the consent screen.")
    audience = models.CharField(max_length=500, help_text="Audience URI of the system it is for.")
    sensitivity = models.CharField(
        max_length=16,
        choices=Sensitivity.choices,
        default=Sensitivity.STANDARD,
        db_index=True,
    )
    approval_window = models.PositiveIntegerField(
        "approval window (seconds)",
        default=_default_approval_window,
        validators=[MinValueValidator(10)],
        help_text="Step-up only: how long the user has to answer a prompt.",
    )
    action_token_ttl = models.PositiveIntegerField(
        "action-token lifetime (seconds)",
        default=_default_action_token_ttl,
        validators=[MinValueValidator(10)],
        help_text="Step-up only: how long an approved one-shot token stays redeemable.",
    )
    fresh_auth_seconds = models.PositiveIntegerField(
        "fresh authentication (seconds)",
        null=True,
        blank=True,
        help_text="Step-up only: approving needs a sign-in this recent. Empty: no requirement.",
    )
    authorization_details_types = models.JSONField(
        default=list,
        blank=True,
        help_text='Step-up only: RFC 9396 types accepted, e.g. ["ledger_entry"].',
    )
    auto_approve_rule = models.CharField(
        max_length=300,
        blank=True,
        help_text="Step-up only: e.g. 'amount <= 10000'; matching requests mint without a prompt.",
    )
    require_second_factor = models.BooleanField(
        default=False,
        help_text="Consenting to this scope needs a password and a TOTP code.",
    )
    # Budgets (consent.budget): the most a user may let an agent spend without a prompt. All empty:
    # no budget is offered for this scope.
    budget_currency = models.CharField(
        max_length=3,
        blank=True,
        help_text="Step-up only: ISO 4217 code budgets are kept in, e.g. USD.",
    )
    budget_max_per_action = models.DecimalField(
        "largest per-action ceiling",
        max_digits=18,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="Step-up only: the highest 'up to N each' a user may set.",
    )
    budget_max_total = models.DecimalField(
        "largest period total",
        max_digits=18,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="Step-up only: the highest total per period a user may set.",
    )
    budget_periods = models.JSONField(
        default=list,
        blank=True,
        help_text='Step-up only: periods users may choose, of "day", "week", "month".',
    )
    # Two-person approval (approvals.quorum): N approvals from the approver group's active members.
    quorum = models.PositiveSmallIntegerField(
        "approvals needed",
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Step-up only: how many people must approve. 1 with no group: the user alone, as always.",
    )
    approver_group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="Step-up only: whose members may approve (besides the user, unless excluded).",
    )
    exclude_requester = models.BooleanField(
        default=False,
        help_text="Step-up only: the user the agent acts for may not approve their own request.",
    )
    quorum_when = models.CharField(
        "quorum only when",
        max_length=300,
        blank=True,
        help_text="Step-up only: e.g. 'amount > 10000'; empty: every request needs the quorum.",
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    BUDGET_PERIODS = ("day", "week", "month")

    class Meta:
        ordering = ["name"]
        verbose_name = "scope policy"
        verbose_name_plural = "scope policies"

    def __str__(self) -> str:
        return self.name

    @property
    def is_step_up(self) -> bool:
        return self.sensitivity == self.Sensitivity.STEP_UP

    @property
    def offers_budget(self) -> bool:
        return bool(
            self.is_step_up
            and self.budget_currency
            and self.budget_max_per_action
            and self.budget_max_total
            and self.budget_periods
        )

    @property
    def budget_limits(self) -> str:
        """The administrator's maximum, as the consent screen words it."""
        if not self.offers_budget or self.budget_max_per_action is None or self.budget_max_total is None:
            return ""
        return (
            f"at most {money(self.budget_max_per_action, self.budget_currency)} each and "
            f"{money(self.budget_max_total, self.budget_currency)} per period"
        )

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        try:
            validate_rule(self.auto_approve_rule)
        except ValueError as exc:
            raise ValidationError({"auto_approve_rule": str(exc)}) from exc
        if self.auto_approve_rule and not self.is_step_up:
            raise ValidationError({"auto_approve_rule": "Only step-up scopes have auto-approve rules."})
        self._clean_quorum()
        types = self.authorization_details_types
        if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
            raise ValidationError(
                {"authorization_details_types": 'A list of type names, e.g. ["ledger_entry"].'}
            )
        self._clean_budget(ValidationError)

    def _clean_budget(self, error: type[Exception]) -> None:
        periods = self.budget_periods
        if not isinstance(periods, list) or not all(p in self.BUDGET_PERIODS for p in periods):
            raise error({"budget_periods": 'A list of "day", "week", "month".'})
        fields = (self.budget_currency, self.budget_max_per_action, self.budget_max_total, periods)
        if any(fields) and not all(fields):
            raise error(
                {"budget_currency": "Set the currency, both maximums and the periods, or none of them."}
            )
        if self.budget_currency and (
            len(self.budget_currency) != 3
            or not self.budget_currency.isupper()
            or not self.budget_currency.isalpha()
        ):
            raise error({"budget_currency": "An ISO 4217 code such as USD."})
        if all(fields) and not self.is_step_up:
            raise error({"budget_currency": "Only step-up scopes offer budgets."})
        for name in ("budget_max_per_action", "budget_max_total"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise error({name: "A positive amount."})

    @property
    def has_quorum(self) -> bool:
        return self.quorum > 1 or self.approver_group_id is not None or self.exclude_requester

    def _clean_quorum(self) -> None:
        from django.core.exceptions import ValidationError

        try:
            validate_rule(self.quorum_when)
        except ValueError as exc:
            raise ValidationError(
                {"quorum_when": str(exc).replace("auto-approve rule", "quorum condition")}
            ) from exc
        if self.quorum is not None and self.quorum < 1:
            raise ValidationError({"quorum": "At least 1."})
        if not self.has_quorum:
            if self.quorum_when:
                raise ValidationError(
                    {"quorum_when": "A condition needs a quorum above 1 or an approver group."}
                )
            return
        if not self.is_step_up:
            raise ValidationError({"quorum": "Only step-up scopes ask for approvals."})
        if self.approver_group_id is None:
            raise ValidationError(
                {"approver_group": "A quorum above 1, or excluding the user, needs an approver group."}
            )


class SessionGrant(models.Model):  # type: ignore[django-manager-missing]  # its tokens subclass untyped DOT models
    """The consent event: one user, one agent, the scopes shown and allowed."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        REVOKED = "revoked", "Revoked"
        EXPIRED = "expired", "Expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="session_grants"
    )
    agent = models.ForeignKey(
        settings.OAUTH2_PROVIDER_APPLICATION_MODEL, on_delete=models.CASCADE, related_name="session_grants"
    )
    standard_scopes = models.JSONField(default=list, help_text="Usable on the session token.")
    step_up_scopes = models.JSONField(default=list, help_text="Each use needs the user's confirmation.")
    consent_shown = models.JSONField(default=dict, help_text="What the consent screen displayed.")
    dpop_jkt = models.CharField(
        "DPoP key thumbprint",
        max_length=64,
        blank=True,
        help_text="Set when the first DPoP-bound token of this grant is issued; later tokens need a proof too.",
    )
    permitted_delegates = models.JSONField(
        default=list, blank=True, help_text="Sub-agents (client ids) the user let this agent delegate to."
    )
    auth_time = models.DateTimeField()
    acr = models.CharField(max_length=100, blank=True)
    amr = models.JSONField(default=list)
    created = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = "session grant"

    def __str__(self) -> str:
        return f"{self.agent.name} for {self.user} ({self.status})"

    @property
    def scopes(self) -> list[str]:
        return [*self.standard_scopes, *self.step_up_scopes]

    def is_live(self, at: datetime | None = None) -> bool:
        return self.status == self.Status.ACTIVE and self.expires_at > (at or timezone.now())

    END_REASONS = {
        "revoked_by_user": "you revoked it",
        "revoked_by_admin": "an administrator revoked it",
        "revoked_by_agent": "the agent gave it up",
        "agent_suspended": "the agent was suspended",
        "refresh_token_reused": "a stolen or replayed token was detected",
        "authorization_code_reused": "a replayed sign-in code was detected",
        "lifetime_ended": "its time ran out",
    }

    @property
    def end_reason_label(self) -> str:
        return self.END_REASONS.get(self.end_reason, self.end_reason.replace("_", " "))

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.created


class GrantUse(models.Model):
    """One accepted use of a session token, reported afterwards by the resource server that
    served it (``/o/usage/``). Only a token issued for that resource server's audience counts;
    ``report_id`` makes a repeated report count once."""

    grant = models.ForeignKey(SessionGrant, on_delete=models.CASCADE, related_name="uses")
    resource_server = models.ForeignKey(ResourceServer, on_delete=models.CASCADE, related_name="+")
    report_id = models.CharField(max_length=64)
    jti = models.CharField(max_length=64)
    scope = models.CharField(max_length=100)
    operation = models.CharField(max_length=80, blank=True)
    outcome = models.CharField(max_length=16)
    used_at = models.DateTimeField()
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["resource_server", "report_id"], name="grant_use_once")
        ]
        indexes = [models.Index(fields=["grant", "used_at"], name="grant_use_grant_time")]

    def __str__(self) -> str:
        return f"{self.operation or self.scope} at {self.used_at:%Y-%m-%d %H:%M:%S}"


class AgentInstance(models.Model):
    """One running instance of an agent, as seen on one session grant.

    An instance proves a key of its own, which the agent's registered key vouches for in a Client
    Attestation (draft-ietf-oauth-attestation-based-client-auth, ``consent.oauth.attestation``). The
    record is made on the instance's first token on the grant; cutting it off ends that instance's
    use of the grant and leaves the grant and the agent's other instances as they are.
    """

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        CUT_OFF = "cut_off", "Cut off"

    agent = models.ForeignKey(
        settings.OAUTH2_PROVIDER_APPLICATION_MODEL, on_delete=models.CASCADE, related_name="instances"
    )
    grant = models.ForeignKey(SessionGrant, on_delete=models.CASCADE, related_name="instances")
    instance_id = models.CharField(
        max_length=64, help_text="The id the agent gave the instance (act.instance)."
    )
    jkt = models.CharField(
        "key thumbprint", max_length=64, help_text="RFC 7638 thumbprint of the instance's key."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)
    cut_off_at = models.DateTimeField(null=True, blank=True)
    cut_off_by = models.CharField(
        max_length=100, blank=True, help_text="Who cut it off (user:<pk>, admin:<name>)."
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["grant", "instance_id"], name="agent_instance_once")]
        verbose_name = "agent instance"

    def __str__(self) -> str:
        return f"instance {self.instance_id} of {self.agent_id} ({self.status})"

    @property
    def short_id(self) -> str:
        return self.short(self.instance_id)

    @staticmethod
    def short(instance: str) -> str:
        """How a person reads an instance id: "3f9c…" (the whole id is on the record)."""
        return instance if len(instance) <= 5 else f"{instance[:4]}…"


class AuthorizationCode(AbstractGrant):  # type: ignore[misc]  # django-oauth-toolkit ships no types
    session_grant = models.ForeignKey(SessionGrant, on_delete=models.CASCADE, related_name="codes")
    consumed_at = models.DateTimeField(
        null=True, blank=True, help_text="Set on exchange; reuse revokes the grant."
    )

    class Meta(AbstractGrant.Meta):  # type: ignore[misc]  # django-oauth-toolkit ships no types
        swappable = "OAUTH2_PROVIDER_GRANT_MODEL"


# The token tables' references carry no FOREIGN KEY constraint in PostgreSQL (db_constraint=False);
# Django still joins, cascades and nulls through them as declared. Every row is written by one
# statement that read the grant, agent and user it names in the same statement (consent.rows.Batch),
# and a token whose grant, agent or user is gone authenticates nothing: every reader joins them
# (tests/consent/test_token_references.py). The constraints' deferred checks were a SELECT ... FOR
# KEY SHARE of each parent row per token row at COMMIT, nine per code exchange or refresh, every
# request locking the same agent and user rows: about a third of PostgreSQL's CPU for a token
# request (bench/peers.py with and without them, docs/deployment.md).
def _unconstrained_references(*, optional: bool) -> tuple[Any, Any]:
    """DOT's ``user`` and ``application`` of a token model, as references without a constraint."""
    nullable: dict[str, Any] = {"blank": True, "null": True} if optional else {}
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="%(app_label)s_%(class)s",
        verbose_name="user",
        db_constraint=False,
        **nullable,
    )
    agent = models.ForeignKey(
        oauth2_settings.APPLICATION_MODEL,
        on_delete=models.CASCADE,
        verbose_name="application",
        db_constraint=False,
        **nullable,
    )
    return user, agent


def _sibling(model: str, *, related_name: str, verbose_name: str) -> Any:
    """The token issued with this one (DOT's one-to-one), nulled when it goes; no constraint."""
    return models.OneToOneField(
        model,
        on_delete=models.SET_NULL,
        blank=True,
        null=True,
        related_name=related_name,
        verbose_name=verbose_name,
        db_constraint=False,
    )


class AccessToken(AbstractAccessToken):  # type: ignore[misc]  # django-oauth-toolkit ships no types
    user, application = _unconstrained_references(optional=True)
    source_refresh_token = _sibling(
        oauth2_settings.REFRESH_TOKEN_MODEL,
        related_name="refreshed_access_token",
        verbose_name="source refresh token",
    )
    session_grant = models.ForeignKey(
        SessionGrant, on_delete=models.CASCADE, related_name="access_tokens", db_constraint=False
    )
    jti = models.CharField(max_length=64, unique=True)

    class Meta(AbstractAccessToken.Meta):  # type: ignore[misc]  # django-oauth-toolkit ships no types
        swappable = "OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL"


class RefreshToken(AbstractRefreshToken):  # type: ignore[misc]  # django-oauth-toolkit ships no types
    user, application = _unconstrained_references(optional=False)
    access_token = _sibling(
        oauth2_settings.ACCESS_TOKEN_MODEL, related_name="refresh_token", verbose_name="access token"
    )
    session_grant = models.ForeignKey(
        SessionGrant, on_delete=models.CASCADE, related_name="refresh_tokens", db_constraint=False
    )
    # The agent instance it was issued to ("" for an agent that runs as one): only that instance refreshes it.
    instance = models.CharField(max_length=64, blank=True, default="")

    class Meta(AbstractRefreshToken.Meta):  # type: ignore[misc]  # django-oauth-toolkit ships no types
        swappable = "OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL"


class IDToken(AbstractIDToken):  # type: ignore[misc]  # django-oauth-toolkit ships no types
    """Unused (no OpenID Connect ID tokens are issued); swapped so DOT's migrations stay acyclic."""

    class Meta(AbstractIDToken.Meta):  # type: ignore[misc]  # django-oauth-toolkit ships no types
        swappable = "OAUTH2_PROVIDER_ID_TOKEN_MODEL"


class SigningKey(models.Model):
    """A JWT signing key. One is active; retired ones stay published until their tokens expire."""

    kid = models.CharField(max_length=64, unique=True)
    alg = models.CharField(max_length=8, choices=[("ES256", "ES256"), ("RS256", "RS256")])
    private_pem = models.TextField()
    public_jwk = models.JSONField()
    created = models.DateTimeField(default=timezone.now)
    active = models.BooleanField(default=True, db_index=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    publish_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="After this, no unexpired token it signed can exist.",
    )

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(
                fields=["active"], condition=models.Q(active=True), name="one_active_signing_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.alg} {self.kid} ({'active' if self.active else 'retired'})"

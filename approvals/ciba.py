"""OpenID Connect Client-Initiated Backchannel Authentication (CIBA) Core 1.0.

https://openid.net/specs/openid-client-initiated-backchannel-authentication-core-1_0.html

Validation of a backchannel authentication request (§7.1, §7.2, §13). The
``login_hint_token`` is the agent's current session access token: it names the
user and the session grant and proves the grant is live. The request must ask
for exactly one step-up scope that is both in the agent's registry and in the
grant, with RFC 9396 ``authorization_details`` of a type that scope accepts.
"""

import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from consent import rows
from consent.budget import Budget
from consent.conf import countersign_settings
from consent.errors import InstanceMismatch
from consent.instances import instance_of
from consent.models import AccessToken, Agent, ScopePolicy, SessionGrant
from consent.oauth.client_auth import AGENT_ROW
from consent.tokens import MAX_TOKEN_BYTES, SESSION_TOKEN_TYP, TokenInvalid, token_checksum, verify

from . import rar
from .errors import (
    BackchannelAccessDenied,
    ExpiredLoginHintToken,
    InvalidAuthorizationDetails,
    InvalidBindingMessage,
    InvalidRequest,
    InvalidScope,
)

if TYPE_CHECKING:
    from .quorum import Quorum

# Asking the user to keep a session grant alive longer goes through the same prompts.
EXTEND_SCOPE = "grant:extend"
EXTENSION_TYPE = "grant_extension"


@dataclass(frozen=True)
class BackchannelRequest:
    agent: Agent
    grant: SessionGrant
    scope: str
    system: str  # what the prompt's headline names as the target
    auto_approve_rule: str
    authorization_details: list[dict[str, Any]]
    action_hash: str
    binding_message: str
    window_seconds: int
    delivery_mode: str
    client_notification_token: str
    # The grant's active budget on this scope, as the login hint's statement read it; with
    # ``budget_read`` False (a request built elsewhere) the request path reads it itself.
    budget: Budget | None = None
    budget_read: bool = False
    instance: str = ""  # the agent instance that asks (act.instance of its token), "" for the agent as one
    # The quorum the scope's policy asks of these details (None: the user alone), as read with the
    # policy; with ``quorum_read`` False the request path reads it itself where it needs it.
    quorum: "Quorum | None" = None
    quorum_read: bool = False


@dataclass(frozen=True)
class LoginHint:
    """What one statement reads for a request: the hint token's row, its grant and agent, and the policy
    of the scope asked for (None if there is no such policy)."""

    token_expires: datetime
    grant: SessionGrant
    agent: Agent
    policy: ScopePolicy | None
    budget: Budget | None = None


_HINT_TOKEN = rows.Columns(AccessToken, "t", ["expires"])
_HINT_GRANT = rows.Columns(
    SessionGrant, "g", ["id", "user", "agent", "status", "expires_at", "step_up_scopes", "dpop_jkt"]
)
_POLICY = rows.Columns(
    ScopePolicy,
    "p",
    [
        "id",
        "name",
        "sensitivity",
        "description",
        "approval_window",
        "authorization_details_types",
        "auto_approve_rule",
        "quorum",
        "approver_group",
        "exclude_requester",
        "quorum_when",
    ],
)
_BUDGET = rows.Columns(
    Budget,
    "b",
    ["id", "grant", "scope", "currency", "per_action", "total", "period", "period_start", "used", "status"],
)


def read_login_hint(token: str, scope: str) -> LoginHint | None:
    """The row of the session token named by ``login_hint_token``, with what validation needs."""
    if not token or len(token) > MAX_TOKEN_BYTES:
        return None
    sql = (
        f"SELECT {_HINT_TOKEN.sql}, {_HINT_GRANT.sql}, {AGENT_ROW.sql}, {_POLICY.sql}, {_BUDGET.sql}"
        f" FROM {rows.table(AccessToken)} t"
        f" JOIN {rows.table(SessionGrant)} g ON g.id = t.session_grant_id"
        f" JOIN {rows.table(Agent)} a ON a.id = t.application_id"
        f" LEFT JOIN {rows.table(ScopePolicy)} p ON p.name = %s"
        f" LEFT JOIN {rows.table(Budget)} b ON b.grant_id = g.id AND b.scope = p.name AND b.status = %s"
        f" WHERE t.token_checksum = %s"
    )
    row = rows.fetchone(sql, [scope, Budget.Status.ACTIVE, token_checksum(token)])
    if row is None:
        return None
    token_row, grant, agent, policy, budget = rows.split(
        row, _HINT_TOKEN, _HINT_GRANT, AGENT_ROW, _POLICY, _BUDGET
    )
    return LoginHint(
        token_row["expires"],
        rows.instance(SessionGrant, grant),
        rows.instance(Agent, agent),
        rows.instance(ScopePolicy, policy) if policy["id"] is not None else None,
        rows.instance(Budget, budget) if budget["id"] is not None else None,
    )


def _session_grant_from_hint(token: str, agent: Agent, hint: LoginHint | None, instance: str) -> SessionGrant:
    if not token:
        raise InvalidRequest("login_hint_token (the agent's session access token) is required")
    try:
        claims = verify(token, typ=SESSION_TOKEN_TYP)
    except TokenInvalid as exc:
        if "expired" in str(exc):
            raise ExpiredLoginHintToken("the session access token has expired") from exc
        raise InvalidRequest(f"login_hint_token is not a valid session access token ({exc})") from exc
    if claims.get("client_id") != agent.client_id:
        raise InvalidRequest("login_hint_token was issued to another client")
    if instance_of(claims) != instance:
        raise InstanceMismatch(
            "login_hint_token was issued to another instance of the agent",
            reason=f"login_hint_token of instance {instance_of(claims)!r} sent by {instance!r}",
        )
    if hint is None or hint.token_expires <= timezone.now():
        raise BackchannelAccessDenied("the session access token has been revoked")
    grant = hint.grant
    if not grant.is_live():
        state = "expired" if grant.status == SessionGrant.Status.ACTIVE else grant.status
        raise BackchannelAccessDenied(f"the session grant is {state}")
    return grant


def _binding_message(text: str) -> str:
    if len(text) > countersign_settings.BINDING_MESSAGE_MAX:
        raise InvalidBindingMessage(
            f"binding_message is longer than {countersign_settings.BINDING_MESSAGE_MAX} characters"
        )
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text):
        raise InvalidBindingMessage("binding_message contains control or invisible formatting characters")
    return text.strip()


def _window(requested: str | None, maximum: int) -> int:
    """§7.1 ``requested_expiry``: a hint the OP may adjust, reported back as ``expires_in`` (§7.3).

    Never shorter than ``REQUESTED_EXPIRY_MIN``: prompts that vanish within seconds would slip
    past the pending-prompt cap (prompt bombing); never longer than the scope's window.
    """
    if requested is None or requested == "":
        return maximum
    if len(requested) > 10 or not requested.isdigit():
        raise InvalidRequest("requested_expiry must be a positive integer (seconds)")
    seconds = int(requested)
    if seconds <= 0:
        raise InvalidRequest("requested_expiry must be a positive integer (seconds)")
    shortest: int = countersign_settings.REQUESTED_EXPIRY_MIN
    return min(max(seconds, shortest), maximum)


def _extension_details(raw: str, agent: Agent) -> list[dict[str, Any]]:
    try:
        details = rar.parse(raw, allowed_types=[EXTENSION_TYPE])
    except rar.InvalidDetails as exc:
        raise InvalidAuthorizationDetails(str(exc)) from exc
    seconds = details[0].get("seconds")
    if (
        len(details) != 1
        or not isinstance(seconds, int)
        or isinstance(seconds, bool)
        or not (60 <= seconds <= agent.max_grant_lifetime)
    ):
        raise InvalidAuthorizationDetails(
            f'ask for one {{"type": "{EXTENSION_TYPE}", "seconds": N}} with 60 <= N <= {agent.max_grant_lifetime}'
        )
    return details


def _delivery(agent: Agent, params: dict[str, str]) -> tuple[str, str]:
    mode = "ping" if agent.backchannel_client_notification_endpoint else "poll"
    notification_token = params.get("client_notification_token", "")
    if mode == "ping" and not notification_token:
        raise InvalidRequest("client_notification_token is required in ping mode (CIBA §7.1)")
    if len(notification_token) > 1024:
        raise InvalidRequest("client_notification_token is too long")
    return mode, notification_token if mode == "ping" else ""


def validate_backchannel_request(
    *, agent: Agent, params: dict[str, str], hint: LoginHint | None = None, instance: str = ""
) -> BackchannelRequest:
    """CIBA Core §7.1 parameters, checked in the order an agent can act on.

    ``hint`` is ``read_login_hint`` for this request's token and scope, read already
    (the endpoint reads it to authenticate the agent against the same row). ``instance``: the
    agent instance that authenticated (``consent.instances``); its hint token must be its own.
    """
    if hint is None:
        scopes = (params.get("scope") or "").split()
        hint = read_login_hint(params.get("login_hint_token", ""), scopes[0] if len(scopes) == 1 else "")
    if not agent.is_active:
        raise BackchannelAccessDenied("the agent is suspended")
    scopes = (params.get("scope") or "").split()
    if len(scopes) != 1:
        raise InvalidScope("ask for exactly one step-up scope per request")
    scope = scopes[0]
    if scope == EXTEND_SCOPE:
        grant = _session_grant_from_hint(params.get("login_hint_token", ""), agent, hint, instance)
        binding_message = _binding_message(params.get("binding_message", ""))
        details = _extension_details(params.get("authorization_details", ""), agent)
        window = _window(params.get("requested_expiry"), countersign_settings.DEFAULT_APPROVAL_WINDOW)
        mode, notification_token = _delivery(agent, params)
        return BackchannelRequest(
            agent=agent,
            grant=grant,
            scope=scope,
            system="your connection with this agent",
            auto_approve_rule="",
            authorization_details=details,
            action_hash=rar.action_hash(details),
            binding_message=binding_message,
            window_seconds=window,
            delivery_mode=mode,
            client_notification_token=notification_token,
            budget_read=True,
            instance=instance,
        )
    from .quorum import policy_quorum  # quorum -> delivery -> wording -> this module

    policy = hint.policy if hint is not None else ScopePolicy.objects.filter(name=scope).first()
    if policy is None or not policy.is_step_up:
        raise InvalidScope(f"{scope} is not a step-up scope")
    if scope not in (agent.allowed_scopes or []):
        raise InvalidScope(f"{scope} is not among the agent's registered scopes")
    grant = _session_grant_from_hint(params.get("login_hint_token", ""), agent, hint, instance)
    if scope not in grant.step_up_scopes:
        raise InvalidScope(f"the user did not include {scope} in this session's consent")
    binding_message = _binding_message(params.get("binding_message", ""))
    try:
        details = rar.parse(
            params.get("authorization_details", ""),
            allowed_types=list(policy.authorization_details_types or []),
        )
    except rar.InvalidDetails as exc:
        raise InvalidAuthorizationDetails(str(exc)) from exc
    window = _window(params.get("requested_expiry"), policy.approval_window)
    mode, notification_token = _delivery(agent, params)
    return BackchannelRequest(
        agent=agent,
        grant=grant,
        scope=scope,
        system=policy.description,
        auto_approve_rule=policy.auto_approve_rule,
        authorization_details=details,
        action_hash=rar.action_hash(details),
        binding_message=binding_message,
        window_seconds=window,
        delivery_mode=mode,
        client_notification_token=notification_token,
        budget=hint.budget if hint is not None else None,
        budget_read=hint is not None,
        instance=instance,
        quorum=policy_quorum(policy, details),
        quorum_read=True,
    )

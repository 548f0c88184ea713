"""Reads for the consent app."""

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.utils import timezone

from . import rows
from .conf import countersign_settings
from .instances import instance_of
from .models import AccessToken, Agent, AgentInstance, ResourceServer, ScopePolicy, SessionGrant
from .oauth.client_auth import secret_matches
from .tokens import SESSION_TOKEN_TYP, TokenInvalid, token_checksum, verify

# client_id -> (trusted until (monotonic), the row, SHA-256 of the secret it was verified with)
_rs_verified: dict[str, tuple[float, ResourceServer, bytes]] = {}


def resource_server_authenticate(
    *, client_id: str, secret: str, cached: bool = False
) -> ResourceServer | None:
    """The active resource server with these credentials, or None.

    ``cached``: a process may reuse a verification for ``CLIENT_CACHE_SECONDS``. Only
    for callers whose own statement re-checks the row it got (active, same secret
    hash: ``RS_CURRENT``), as redemption and session-token introspection do, or that
    authenticate again before any answer their statement did not check, so a
    deactivation or a new secret still counts at once.
    """
    digest = hashlib.sha256(secret.encode()).digest()
    if cached:
        hit = _rs_verified.get(client_id)
        if hit is not None and hit[0] > time.monotonic() and hmac.compare_digest(hit[2], digest):
            return hit[1]
    rs = ResourceServer.objects.filter(client_id=client_id, is_active=True).first()
    if rs is None or not secret_matches(secret, rs.client_secret):
        _rs_verified.pop(client_id, None)
        return None
    if cached:
        _rs_verified[client_id] = (time.monotonic() + countersign_settings.CLIENT_CACHE_SECONDS, rs, digest)
    return rs


def forget_resource_server(client_id: str) -> None:
    _rs_verified.pop(client_id, None)


# True while the resource server a request authenticated as (perhaps from this process's cache) is
# still active with the secret it was verified with; params ``rs_current_params``.
RS_CURRENT = (
    f"EXISTS (SELECT 1 FROM {rows.table(ResourceServer)} r WHERE r.id = %s AND r.is_active = %s"
    f" AND r.client_secret = %s)"
)


def rs_current_params(resource_server: ResourceServer) -> list[Any]:
    return [resource_server.pk, True, resource_server.client_secret]


def scope_policies(names: list[str]) -> list[ScopePolicy]:
    by_name = {p.name: p for p in ScopePolicy.objects.filter(name__in=names)}
    return [by_name[n] for n in names if n in by_name]


def grants_for_user(*, user: User) -> QuerySet[SessionGrant]:
    return SessionGrant.objects.filter(user=user).select_related("agent").order_by("-created")


_TOKEN_EXPIRES = rows.Columns(AccessToken, "t", ["expires"])
_GRANT_STATE = rows.Columns(SessionGrant, "g", ["status", "expires_at"])
_AGENT_STATUS = rows.Columns(Agent, "a", ["status"])
_INSTANCE_STATUS = rows.Columns(AgentInstance, "i", ["status"])


@dataclass(frozen=True)
class Introspection:
    active: bool
    claims: dict[str, Any]
    reason: str = ""
    # What the introspection's own statement found of the resource server asking (``RS_CURRENT``):
    # None where it did not look (no statement ran, or another kind of token's introspector).
    resource_server_current: bool | None = None

    def as_response(self) -> dict[str, Any]:
        """RFC 7662 §2.2 response members."""
        if not self.active:
            return {"active": False}
        c = self.claims
        return {
            "active": True,
            "token_type": "Bearer",
            **{
                k: c[k]
                for k in (
                    "iss",
                    "sub",
                    "aud",
                    "act",
                    "scope",
                    "client_id",
                    "grant_id",
                    "exp",
                    "iat",
                    "jti",
                    "auth_time",
                    "acr",
                    "amr",
                    "cnf",
                    # action tokens (RFC 9396 §9.2): what exactly was approved
                    "authorization_details",
                    "action_hash",
                    "approval_id",
                )
                if k in c
            },
        }


# Token type (JWT ``typ``) -> its RFC 7662 introspection, for kinds another app mints: approvals
# registers the action token's (``action+jwt``) when it starts, as consent imports nothing above it.
TOKEN_INTROSPECTORS: dict[str, Callable[..., Introspection]] = {}


def session_token_introspect(*, token: str, resource_server: ResourceServer) -> Introspection:
    """RFC 7662: is this session token active, for this resource server, right now?

    Inactive when it does not verify, is expired, was not issued to this resource
    server's audience, or its grant is revoked/expired, its agent suspended, or the agent
    instance it was issued to (``act.instance``) cut off.
    """
    try:
        claims = verify(token, typ=SESSION_TOKEN_TYP)
    except TokenInvalid as exc:
        return Introspection(False, {}, str(exc))
    aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if resource_server.audience not in aud:
        return Introspection(False, {}, "token not issued for this resource server")
    # One statement: the token with its grant, agent and instance, and whether the resource server
    # is still the one this request authenticated as (its check may have come from the cache).
    row = rows.fetchone(
        f"SELECT {RS_CURRENT}, t.id IS NOT NULL, {_TOKEN_EXPIRES.sql}, {_GRANT_STATE.sql},"
        f" {_AGENT_STATUS.sql}, {_INSTANCE_STATUS.sql}"
        f" FROM (SELECT 1) one LEFT JOIN ({rows.table(AccessToken)} t"
        f" JOIN {rows.table(SessionGrant)} g ON g.id = t.session_grant_id"
        f" JOIN {rows.table(Agent)} a ON a.id = t.application_id"
        f" LEFT JOIN {rows.table(AgentInstance)} i ON i.grant_id = g.id AND i.instance_id = %s)"
        f" ON t.token_checksum = %s",
        [*rs_current_params(resource_server), instance_of(claims), token_checksum(token)],
    )
    assert row is not None  # (SELECT 1) LEFT JOIN: always one row
    if not row[0]:
        return Introspection(False, {}, "resource server changed", resource_server_current=False)

    def answer(active: bool, reason: str = "") -> Introspection:
        return Introspection(active, claims if active else {}, reason, resource_server_current=True)

    now = timezone.now()
    if not row[1]:
        return answer(False, "token revoked")
    token_row, grant_row, agent_row, instance_row = rows.split(
        row[2:], _TOKEN_EXPIRES, _GRANT_STATE, _AGENT_STATUS, _INSTANCE_STATUS
    )
    if token_row["expires"] <= now:
        return answer(False, "token revoked")
    if grant_row["status"] != SessionGrant.Status.ACTIVE or grant_row["expires_at"] <= now:
        return answer(False, f"grant {grant_row['status']}")
    if agent_row["status"] not in (
        Agent.Status.ACTIVE,
        Agent.Status.PENDING_REVIEW,
    ):  # pending: session scopes
        return answer(False, "agent suspended")
    if instance_row["status"] == AgentInstance.Status.CUT_OFF:
        return answer(False, "instance cut off")
    return answer(True)

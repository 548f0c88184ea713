"""What every grant at the token endpoint shares: the request it reads, and issuing a session token.

``TokenRequest`` carries one token request's state (its parameters, the credentials it
presented, the agent once authenticated, the DPoP key it proved) from the endpoint to
the grant, so nothing travels beside the call.

``issue_session_token`` is RFC 6749 §5.1's successful response for the code exchange
and refresh grants: a session access token (RFC 9068 JWT, ``act`` = the agent, RFC 8693
§4.1), and a rotating refresh token when the agent's refresh mode allows one (§6,
RFC 9700 §4.14.2). Both rows are stored by checksum only (RFC 9700 §4.14: no reusable
token at rest), written with the audit event in one statement (``rows.Batch``).
"""

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from django.db import transaction

from audit.services import audit_event

from .. import rows
from ..errors import ConcurrentUse, InstanceMismatch, InvalidClient, InvalidDPoPProof, UnknownGrant
from ..instances import act_claim, instance_admit
from ..models import AccessToken, Agent, RefreshToken, SessionGrant
from ..oauth.attestation import InstanceProof
from ..oauth.client_auth import AGENT_ROW, Credentials, authenticate_client, authenticate_client_request
from ..oauth.dpop import check_agent_key, check_grant_binding
from ..tokens import SESSION_TOKEN_TYP, bind_to_proof_key, session_claims, sign, token_checksum, token_type

# What the grants read of a session grant, beside their own rows (and the agent's, AGENT_ROW).
GRANT_COLUMNS = [
    "id",
    "user",
    "status",
    "expires_at",
    "auth_time",
    "acr",
    "amr",
    "standard_scopes",
    "dpop_jkt",
]
_GRANT = rows.Columns(SessionGrant, "g", GRANT_COLUMNS)
Found = tuple[dict[str, Any], SessionGrant, Agent]  # a credential's row, its session grant, its agent


@cache
def _credential_sql(own: rows.Columns, where: str, lock: bool) -> str:
    return (
        f"SELECT {own.sql}, {_GRANT.sql}, {AGENT_ROW.sql} FROM {rows.table(own.model)} {own.alias}"
        f" JOIN {rows.table(SessionGrant)} g ON g.id = {own.alias}.session_grant_id"
        f" JOIN {rows.table(Agent)} a ON a.id = {own.alias}.application_id"
        f" WHERE {where}{rows.for_update(own.alias) if lock else ''}"
    )


def credential_row(own: rows.Columns, where: str, value: str, *, lock: bool) -> Found | None:
    """A single-use credential's row (``own``: a code, a refresh token) with its session grant and its
    agent, in one statement, so client authentication needs no query of its own. ``lock`` holds the
    credential's row until the transaction ends."""
    row = rows.fetchone(_credential_sql(own, where, lock), [value])
    if row is None:
        return None
    found, grant, agent = rows.split(row, own, _GRANT, AGENT_ROW)
    return found, rows.instance(SessionGrant, grant), rows.instance(Agent, agent)


class CredentialReused(Exception):
    """A single-use credential (a code, a refresh token) came back after it was used."""

    def __init__(self, found: Found):
        self.row, self.grant, self.agent = found


def spend_once(
    decide: Callable[[Found | None], dict[str, Any] | None],
    *,
    read: Callable[[], Found | None],
    read_locked: Callable[[], Found | None],
    lost: str,
) -> dict[str, Any]:
    """Spend a single-use credential: ``decide`` on its row as read without a lock (the guarded
    write in its ``rows.Batch`` decides a race); if a concurrent request took it meanwhile
    (``decide`` returned None), read it again holding its row lock and decide again, so the loser
    sees it used and refuses as the grant says (``CredentialReused``, or its own error). ``lost``
    is the refusal reason should that still not settle it (only without row locks)."""
    body = decide(read())
    if body is None:
        with transaction.atomic():
            body = decide(read_locked())
    if body is None:
        raise ConcurrentUse(reason=lost)
    return body


@dataclass
class TokenRequest:
    """One token request (RFC 6749 §3.2), as the grants see it.

    ``presented`` is what client authentication the request carried, or why it carried
    none usable; a grant reads ``credentials`` when it authenticates the client, so a
    missing grant parameter is reported before a missing client (oauthlib's order).
    """

    params: dict[str, str]
    presented: Credentials | InvalidClient
    uri: str  # this endpoint's URL: the audience a private_key_jwt assertion may name
    dpop_jkt: str = ""  # RFC 7638 thumbprint of a valid DPoP proof's key, "" without one
    agent: Agent | None = None  # set once the client is authenticated
    instance: InstanceProof | None = None  # which instance of the agent, when it authenticated as one

    @property
    def credentials(self) -> Credentials:
        if isinstance(self.presented, InvalidClient):
            raise self.presented
        return self.presented

    def authenticate(self) -> Agent:
        """Authenticate the client against the registry (for grants that read no agent row first)."""
        self.agent, self.instance = authenticate_client_request(self.credentials, endpoint_url=self.uri)
        self.check_agent_key()
        return self.agent

    def authenticate_holder(self, found: Found | None, *, unknown: str) -> Found:
        """Authenticate the client as the agent a credential's row (``credential_row``) names.

        A credential that is unknown, or another agent's, is ``invalid_grant`` (``unknown`` is the
        reason), but only once the client has authenticated against the registry: which error a
        request gets depends on who is asking (RFC 6749 §5.2).
        """
        if found is None or found[2].client_id != self.credentials.client_id:
            self.authenticate()
            raise UnknownGrant(reason=unknown)
        self.agent, self.instance = authenticate_client(self.credentials, found[2], endpoint_url=self.uri)
        self.check_agent_key()
        return found

    @property
    def instance_id(self) -> str:
        """The authenticated instance's id, "" for an agent that runs as one."""
        return self.instance.instance if self.instance is not None else ""

    def check_agent_key(self) -> None:
        if self.instance is None:
            assert self.agent is not None  # called once the client is authenticated
            check_agent_key(self.dpop_jkt, self.agent)
        elif self.dpop_jkt and self.dpop_jkt != self.instance.jkt:  # an instance proves with its own key
            raise InvalidDPoPProof(
                "the DPoP key is not the key attested for this instance",
                reason="DPoP key is not the instance's attested key",
            )
        elif not self.dpop_jkt and self.agent is not None and self.agent.require_dpop:
            raise InvalidDPoPProof(
                "this agent must present a DPoP proof (RFC 9449)", reason="DPoP required for this agent"
            )

    def check_instance(self, bound_to: str) -> None:
        """A credential issued to one instance (or to the agent as one) serves only it."""
        if bound_to != self.instance_id:
            raise InstanceMismatch(
                "This credential was issued to another instance of the agent.",
                reason=f"credential of instance {bound_to!r} presented by {self.instance_id!r}",
            )

    def admit_instance(self, grant: SessionGrant, now: datetime) -> None:
        """Record the instance on ``grant`` or refuse it if cut off (one statement; none without one)."""
        if self.instance is not None and self.agent is not None:
            instance_admit(agent=self.agent, grant=grant, proof=self.instance, where="token", now=now)

    def check_grant_binding(self, grant: SessionGrant) -> None:
        check_grant_binding(self.dpop_jkt, grant.dpop_jkt)


def session_token_lifetime(agent: Agent, grant: SessionGrant, now: datetime) -> int:
    """The agent's access-token TTL, never past the end of the session grant."""
    remaining = int((grant.expires_at - now).total_seconds())
    return max(1, min(agent.access_token_ttl, remaining))


def live_grant(grant: SessionGrant, now: datetime) -> tuple[str, list[Any]]:
    """SQL that holds the session grant as it is (``FOR SHARE``) and is true while it is live.

    A revocation (``grant_revoke``'s UPDATE of the grant row) either waits for the statement
    that holds it, and then ends the token it wrote, or commits first, and the statement
    writes nothing.
    """
    sql = (
        f"SELECT 1 FROM {rows.table(SessionGrant)} WHERE id = %s AND status = %s AND expires_at > %s"
        f"{rows.for_share()}"
    )
    return sql, [
        rows.param(SessionGrant, "id", grant.pk),
        SessionGrant.Status.ACTIVE,
        rows.param(SessionGrant, "expires_at", now),
    ]


def access_token_row(
    token: str,
    *,
    claims: dict[str, Any],
    grant: SessionGrant,
    agent: Agent,
    now: datetime,
    source_refresh_token: int | None = None,
    resource: list[str] | None = None,
) -> dict[str, Any]:
    """The session token's row, by checksum, pointing at its grant (for revocation)."""
    return {
        "token": "",
        "token_checksum": token_checksum(token),
        "expires": now + timedelta(seconds=claims["exp"] - claims["iat"]),
        "scope": claims["scope"],
        "resource": resource or [],
        "created": now,
        "updated": now,
        "jti": claims["jti"],
        "user": grant.user_id,
        "application": agent.pk,
        "session_grant": grant.pk,
        "source_refresh_token": source_refresh_token,
    }


def issue_session_token(
    req: TokenRequest,
    *,
    grant: SessionGrant,
    scopes: list[str],
    now: datetime,
    batch: rows.Batch,
    rotated_from: dict[str, Any] | None = None,
    resource: list[str] | None = None,
) -> dict[str, Any] | None:
    """Mint, store and audit a session token (and refresh token); the §5.1 response body.

    ``resource``: the RFC 8707 resources the token is for (its ``aud``, exactly), kept on the
    refresh token too so a refresh stays within them; None: every audience of ``scopes``.

    The rows are written by ``batch``, behind its guard (the code consumed, the refresh
    token rotated); None when the guard did not take: a concurrent request won, and
    nothing was written. ``rotated_from`` is the refresh-token row this one replaces
    (its ``id`` and ``token_family``).
    """
    agent = req.agent
    assert agent is not None  # a token is issued only to an authenticated client
    req.admit_instance(grant, now)
    ttl = session_token_lifetime(agent, grant, now)
    claims = session_claims(
        grant=grant, client_id=agent.client_id, scopes=scopes, expires_in=ttl, audience=resource
    )
    claims["act"] = act_claim(agent.client_id, req.instance_id)
    bind_to_proof_key(claims, jkt=req.dpop_jkt, grant_jkt=grant.dpop_jkt)
    access_token = sign(claims, typ=SESSION_TOKEN_TYP)
    scope = " ".join(scopes)
    batch.insert(
        "access_token",
        AccessToken,
        access_token_row(
            access_token,
            claims=claims,
            grant=grant,
            agent=agent,
            now=now,
            source_refresh_token=rotated_from["id"] if rotated_from else None,
            resource=resource,
        ),
    )
    body: dict[str, Any] = {
        "access_token": access_token,
        "expires_in": ttl,
        "token_type": token_type(req.dpop_jkt),
        "scope": scope,
    }
    if agent.refresh_mode == Agent.RefreshMode.ROTATING:
        refresh_token = secrets.token_urlsafe(32)
        batch.insert(
            "refresh_token",
            RefreshToken,
            {
                "token": "",
                "token_checksum": token_checksum(refresh_token),
                "token_family": rotated_from["token_family"] if rotated_from else None,
                "resource": resource or [],
                "created": now,
                "updated": now,
                "revoked": None,
                "access_token": rows.Ref("access_token"),
                "application": agent.pk,
                "user": grant.user_id,
                "session_grant": grant.pk,
                "instance": req.instance_id,
            },
        )
        body["refresh_token"] = refresh_token
    batch.event(
        "audit",
        audit_event(
            event="token.refreshed" if rotated_from else "token.issued",
            actor=agent.actor_id,
            user_id=grant.user_id,
            client_id=agent.client_id,
            grant_id=grant.pk,
            detail={
                "jti": claims["jti"],
                "scope": scope,
                "expires_in": ttl,
                "refresh_token": "refresh_token" in body,
                **({"resource": resource} if resource else {}),
                **({"instance": req.instance_id} if req.instance_id else {}),
            },
        ),
    )
    return body if batch.run() is not None else None

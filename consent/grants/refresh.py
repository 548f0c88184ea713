"""Refreshing a session token (RFC 6749 §6), with rotation and reuse detection.

https://www.rfc-editor.org/rfc/rfc6749#section-6

§6 asks: authenticate the client, check the refresh token was issued to it, and
never grant a scope beyond the original grant. RFC 9700 §4.14.2: every refresh
rotates the refresh token, and presenting a rotated one again is reuse, which
revokes the whole session grant. Only agents in refresh mode ``rotating`` have
refresh tokens at all.

The refresh-token row is read with its session grant and agent in one statement; one
more rotates it (a conditional UPDATE that also holds the grant live) and writes the
new tokens and the audit event (``rows.Batch``). Of two concurrent refreshes with one
token, the loser's UPDATE takes nothing; it reads the row again holding its lock,
finds it rotated: reuse.
"""

from datetime import datetime
from typing import Any

from django.utils import timezone

from audit.services import audit_record

from .. import rows
from ..errors import (
    GrantInactive,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    RefreshNotAllowed,
    RefreshReused,
)
from ..models import AccessToken, Agent, RefreshToken, SessionGrant
from ..oauth.resource import form_resources, narrow
from ..services import grant_revoke
from ..tokens import token_checksum
from .issue import (
    CredentialReused,
    Found,
    TokenRequest,
    credential_row,
    issue_session_token,
    live_grant,
    spend_once,
)

GRANT_TYPE = "refresh_token"

_RT = rows.Columns(
    RefreshToken, "r", ["id", "revoked", "access_token", "token_family", "user", "resource", "instance"]
)


def _select(refresh_token: str, *, lock: bool) -> Found | None:
    return credential_row(
        _RT, "r.token_checksum = %s ORDER BY r.id DESC LIMIT 1", token_checksum(refresh_token), lock=lock
    )


def _read(refresh_token: str) -> Found | None:
    """The refresh token, its session grant and its agent, as they stand (no lock: the write decides)."""
    return _select(refresh_token, lock=False)


def _rotation(rt: dict[str, Any], grant: SessionGrant, now: datetime) -> rows.Batch:
    """Revoke the presented refresh token and retire the access token it last produced (DOT's
    rotation), if it is still unrevoked and its grant live: the batch's guard."""
    live_sql, live_params = live_grant(grant, now)
    batch = rows.Batch(
        rows.guarded_update(
            RefreshToken,
            rt["id"],
            {"revoked": now, "updated": now, "access_token": None},
            f"revoked IS NULL AND EXISTS ({live_sql})",
            live_params,
        )
    )
    if rt["access_token"] is not None:
        batch.delete(AccessToken, rt["access_token"])
    return batch


def _refresh(req: TokenRequest, found: Found | None, now: datetime) -> dict[str, Any] | None:
    """Check the request against the refresh token as read; rotate. None when it was rotated meanwhile."""
    rt, grant, agent = req.authenticate_holder(found, unknown="unknown refresh token")
    if rt["revoked"] is not None:
        raise CredentialReused((rt, grant, agent))
    req.check_instance(rt["instance"])  # an instance's refresh token is that instance's alone
    if agent.refresh_mode != Agent.RefreshMode.ROTATING:
        raise RefreshNotAllowed(reason="agent's refresh mode does not allow refresh tokens")
    if not grant.is_live(now):
        raise GrantInactive(reason="session grant is not active")
    req.check_grant_binding(grant)
    scopes = list(grant.standard_scopes)
    if req.params.get("scope"):
        asked = req.params["scope"].split()
        if not set(asked) <= set(scopes):
            raise InvalidScope(reason="refresh asked for scopes beyond the grant")
        scopes = [s for s in scopes if s in asked]
    # RFC 8707 §2.2: a refresh may ask for the original resources or fewer, never others.
    resource = None
    original = list(rt["resource"] or [])
    asked_resources = form_resources(req.params.get("resource", "")) or original
    if asked_resources:
        if original and not set(asked_resources) <= set(original):
            raise InvalidTarget(
                "The requested resource is outside the original grant.",
                reason="refresh asked for a resource beyond the original request",
            )
        resource, scopes = narrow(asked_resources, scopes)
    return issue_session_token(
        req,
        grant=grant,
        scopes=scopes,
        now=now,
        batch=_rotation(rt, grant, now),
        rotated_from=rt,
        resource=resource,
    )


def refresh(req: TokenRequest) -> dict[str, Any]:
    presented = req.params.get("refresh_token")
    if not presented:
        raise InvalidRequest("Missing refresh token parameter.")
    now = timezone.now()
    try:
        return spend_once(
            lambda found: _refresh(req, found, now),
            read=lambda: _read(presented),
            read_locked=lambda: _select(presented, lock=True),
            lost="refresh token reused after rotation",
        )
    except CredentialReused as reused:
        rt, grant, agent = reused.row, reused.grant, reused.agent
    # RFC 9700 §4.14.2: a rotated refresh token came back. Revoke the grant; the reuse row is the refusal.
    revoked = grant_revoke(grant_id=grant.pk, reason="refresh_token_reused", actor=agent.actor_id)
    if not revoked:  # the grant had ended already (revoked, expired): that is what the client must learn
        raise GrantInactive(reason="refresh token of a session grant that has ended")
    audit_record(
        event="refresh_token.reuse_detected",
        outcome="refused",
        actor=agent.actor_id,
        user_id=rt["user"],
        client_id=agent.client_id,
        grant_id=grant.pk,
        error="invalid_grant",
    )
    raise RefreshReused(reason="refresh token reused after rotation", audited=True)

"""Refreshing a session token (RFC 6749 §6), with rotation and reuse detection.

https://www.rfc-editor.org/rfc/rfc6749#section-6

§6 asks: authenticate the client, check the refresh token was issued to it, and
never grant a scope beyond the original grant. RFC 9700 §4.14.2: every refresh
rotates the refresh token, and presenting a rotated one again is reuse, which
revokes the whole session grant. Only agents in refresh mode ``rotating`` have
refresh tokens at all.

The refresh-token row is read with its session grant and agent in one statement and
locked, so of two concurrent refreshes with one token the second waits, then finds
it rotated: reuse.
"""

from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.services import audit_record

from .. import rows
from ..errors import InvalidGrant, InvalidRequest, InvalidScope
from ..models import AccessToken, Agent, RefreshToken, SessionGrant
from ..oauth.client_auth import AGENT_ROW, authenticate
from ..services import grant_revoke
from ..tokens import token_checksum
from .issue import GRANT_COLUMNS, TokenRequest, issue_session_token

GRANT_TYPE = "refresh_token"

_RT = rows.Columns(RefreshToken, "r", ["id", "revoked", "access_token", "token_family", "user"])
_GRANT = rows.Columns(SessionGrant, "g", GRANT_COLUMNS)


def _read(refresh_token: str) -> tuple[dict[str, Any], SessionGrant, Agent] | None:
    sql = (f"SELECT {_RT.sql}, {_GRANT.sql}, {AGENT_ROW.sql} FROM {rows.table(RefreshToken)} r"
           f" JOIN {rows.table(SessionGrant)} g ON g.id = r.session_grant_id"
           f" JOIN {rows.table(Agent)} a ON a.id = r.application_id"
           f" WHERE r.token_checksum = %s ORDER BY r.id DESC LIMIT 1{rows.for_update('r')}")
    row = rows.fetchone(sql, [token_checksum(refresh_token)])
    if row is None:
        return None
    rt, grant, agent = rows.split(row, _RT, _GRANT, AGENT_ROW)
    return rt, rows.instance(SessionGrant, grant), rows.instance(Agent, agent)


def _rotate(rt: dict[str, Any], now) -> None:
    """Revoke the presented refresh token and retire the access token it last produced (DOT's rotation)."""
    rows.execute(f"UPDATE {rows.table(RefreshToken)} SET revoked = %s, updated = %s, access_token_id = NULL"
                 f" WHERE id = %s AND revoked IS NULL",
                 [rows.param(RefreshToken, "revoked", now), rows.param(RefreshToken, "updated", now), rt["id"]])
    if rt["access_token"] is not None:
        rows.execute(f"DELETE FROM {rows.table(AccessToken)} WHERE id = %s", [rt["access_token"]])


def refresh(req: TokenRequest) -> dict[str, Any]:
    presented = req.params.get("refresh_token")
    if not presented:
        raise InvalidRequest("Missing refresh token parameter.")
    now = timezone.now()
    with transaction.atomic():
        found = _read(presented)
        if found is None or found[2].client_id != req.credentials.client_id:
            req.authenticate()
            raise InvalidGrant(reason="unknown refresh token")
        rt, grant, agent = found
        req.agent = authenticate(req.credentials, agent, endpoint_url=req.uri)
        req.check_agent_key()
        reused = rt["revoked"] is not None
        if not reused:
            if agent.refresh_mode != Agent.RefreshMode.ROTATING:
                raise InvalidGrant(reason="agent's refresh mode does not allow refresh tokens")
            if not grant.is_live(now):
                raise InvalidGrant(reason="session grant is not active")
            req.check_grant_binding(grant)
            scopes = list(grant.standard_scopes)
            if req.params.get("scope"):
                asked = req.params["scope"].split()
                if not set(asked) <= set(scopes):
                    raise InvalidScope(reason="refresh asked for scopes beyond the grant")
                scopes = [s for s in scopes if s in asked]
            _rotate(rt, now)
            return issue_session_token(req, grant=grant, scopes=scopes, now=now, rotated_from=rt)
    # RFC 9700 §4.14.2: a rotated refresh token came back. Revoke the grant; the reuse row is the refusal.
    revoked = grant_revoke(grant_id=grant.pk, reason="refresh_token_reused", actor=agent.actor_id)
    if revoked:
        audit_record(event="refresh_token.reuse_detected", outcome="refused", actor=agent.actor_id,
                     user_id=rt["user"], client_id=agent.client_id, grant_id=grant.pk, error="invalid_grant")
    raise InvalidGrant(reason="refresh token reused after rotation", audited=revoked)

"""Authorization code exchange (RFC 6749 §4.1.3) with PKCE S256 (RFC 7636 §4.6).

https://www.rfc-editor.org/rfc/rfc6749#section-4.1.3

What §4.1.3 asks of the server, in this order: authenticate the client (§3.2.1);
the code was issued to this client, is valid and unused; ``redirect_uri`` is the
one of the authorization request. PKCE (RFC 7636 §4.6): the verifier hashes to the
stored challenge (S256 only, RFC 9700 §2.1.1). Countersign adds: the code's session
grant is live, RFC 8707 ``resource`` narrows the token to the resources asked for
(``consent.oauth.resource``), and a code presented twice revokes that grant and everything issued
from it (§4.1.2: "SHOULD revoke ... all tokens previously issued based on that code").

One statement reads the code, its session grant and its agent, so client
authentication needs no query of its own; one more consumes the code (a conditional
UPDATE that also holds the grant live) and writes the session token, the refresh
token and the audit event (``rows.Batch``). A request that loses the code to a
concurrent one reads it again holding its row lock, and so sees it consumed.
"""

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any

from django.utils import timezone

from .. import rows
from ..errors import (
    CodeExpired,
    CodeReused,
    GrantInactive,
    InvalidRequest,
    InvalidTarget,
    PkceMismatch,
    RedirectUriMismatch,
    UnauthorizedClient,
)
from ..models import Agent, AuthorizationCode
from ..oauth.resource import form_resources, narrow
from ..services import grant_revoke
from .issue import (
    CredentialReused,
    Found,
    TokenRequest,
    credential_row,
    issue_session_token,
    live_grant,
    spend_once,
)

GRANT_TYPE = "authorization_code"

_CODE = rows.Columns(
    AuthorizationCode,
    "c",
    [
        "id",
        "expires",
        "redirect_uri",
        "scope",
        "code_challenge",
        "code_challenge_method",
        "consumed_at",
        "session_grant",
        "resource",
    ],
)


def _select(code: str, *, lock: bool) -> Found | None:
    return credential_row(_CODE, "c.code = %s", code, lock=lock)


def _read(code: str) -> Found | None:
    """The code, its session grant and its agent, as they stand (no lock: the write decides)."""
    return _select(code, lock=False)


def _pkce_ok(verifier: str, challenge: str, method: str) -> bool:
    """RFC 7636 §4.6: BASE64URL(SHA256(ASCII(code_verifier))) == code_challenge."""
    if method != "S256":
        return False
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
    return hmac.compare_digest(digest.rstrip(b"=").decode(), challenge)


def _default_redirect_uri(agent: Agent) -> str:
    uris = (agent.redirect_uris or "").split()
    if len(uris) != 1:
        raise InvalidRequest("Missing redirect URI.")
    return uris[0]


def _exchange(req: TokenRequest, found: Found | None, now: datetime) -> dict[str, Any] | None:
    """Check the request against the code as read; issue. None when the code was taken meanwhile."""
    code_row, grant, agent = req.authenticate_holder(found, unknown="unknown authorization code")
    if agent.authorization_grant_type != Agent.GRANT_AUTHORIZATION_CODE:
        raise UnauthorizedClient(reason="agent not registered for the authorization code grant")
    if code_row["consumed_at"] is not None:
        raise CredentialReused((code_row, grant, agent))
    if code_row["expires"] <= now:
        raise CodeExpired(reason="authorization code expired")
    if not grant.is_live(now):
        raise GrantInactive(reason="session grant is not active")
    req.check_grant_binding(grant)
    verifier = req.params.get("code_verifier")
    if not verifier:
        raise InvalidRequest("Code verifier required.")
    if not _pkce_ok(verifier, code_row["code_challenge"], code_row["code_challenge_method"]):
        raise PkceMismatch(reason="PKCE verifier does not match the challenge")
    redirect_uri = req.params.get("redirect_uri") or _default_redirect_uri(agent)
    if redirect_uri != code_row["redirect_uri"]:
        raise RedirectUriMismatch("redirect_uri does not match the authorization request.")
    live_sql, live_params = live_grant(grant, now)
    batch = rows.Batch(
        rows.guarded_update(
            AuthorizationCode,
            code_row["id"],
            {"consumed_at": now},
            f"consumed_at IS NULL AND EXISTS ({live_sql})",
            live_params,
        )
    )
    scopes = [s for s in code_row["scope"].split() if s in grant.standard_scopes]
    resource = None
    authorized = list(code_row["resource"] or [])
    asked = form_resources(req.params.get("resource", "")) or authorized
    if authorized and not set(asked) <= set(authorized):
        raise InvalidTarget(
            "The requested resource was not part of the authorization request.",
            reason="token request asked for a resource beyond the authorization request",
        )
    if asked:  # RFC 8707 §2.2: the token is for what this request (or, without one, the code) names
        resource, scopes = narrow(asked, scopes)
    return issue_session_token(req, grant=grant, scopes=scopes, now=now, batch=batch, resource=resource)


def exchange_code(req: TokenRequest) -> dict[str, Any]:
    code = req.params.get("code")
    if not code:
        raise InvalidRequest("Missing code parameter.")
    now = timezone.now()
    try:
        return spend_once(
            lambda found: _exchange(req, found, now),
            read=lambda: _read(code),
            read_locked=lambda: _select(code, lock=True),
            lost="authorization code reused",
        )
    except CredentialReused as reused:
        # §4.1.2: a code used twice revokes the grant it came from; committed although the request fails.
        grant_revoke(
            grant_id=reused.grant.pk, reason="authorization_code_reused", actor=reused.agent.actor_id
        )
        raise CodeReused(reason="authorization code reused") from None

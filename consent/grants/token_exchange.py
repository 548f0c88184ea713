"""OAuth 2.0 Token Exchange (RFC 8693): re-minting and delegation.

https://www.rfc-editor.org/rfc/rfc8693

``grant_type=urn:ietf:params:oauth:grant-type:token-exchange`` (§2.1), always
with ``private_key_jwt`` client authentication (RFC 7523): a session token alone,
stolen or expired, is worth nothing without the agent's own key.

- **Re-mint** (refresh mode ``exchange``): ``subject_token`` is a session token of
  the calling agent, accepted up to ``EXCHANGE_GRACE_SECONDS`` after it expired,
  while its grant and the agent are active. The new token keeps ``sub``,
  ``grant_id`` and the scopes, or narrows them (``scope``, ``audience``); never
  widens. No refresh token is ever issued.
- **Delegation** (§1.1, §4.1): with ``actor_token`` (a JWT the sub-agent signs
  with its registered key), the calling agent hands a narrowed token to a
  registered sub-agent the user permitted at consent. ``act`` nests the chain:
  ``{"sub": "agent:sub", "act": {"sub": "agent:parent"}}``; only the outermost
  ``act`` is the current actor (§4.1).
"""

import hashlib
import time
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone
from oauth2_provider.models import set_token_value

from audit.services import audit_record

from ..conf import countersign_settings
from ..errors import OAuthError
from ..models import AccessToken, Agent, ScopePolicy, SessionGrant
from ..oauth.private_key_jwt import AssertionInvalid, unverified_issuer, verify_assertion
from ..tokens import (
    SESSION_TOKEN_TYP,
    TokenInvalid,
    actor_id,
    bind_to_proof_key,
    session_claims,
    sign,
    token_type,
    verify,
)
from .base import ExtensionGrant

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
SUBJECT_TOKEN_TYPES = (TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT)


class ExchangeError(OAuthError):
    """RFC 8693 §2.2.2: the exchange is refused with ``error`` (invalid_grant, invalid_target, ...)."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.status_code = error, status


def _param(request, name: str) -> str:
    value = request._params.get(name)
    return value if isinstance(value, str) else ""


def _subject(token: str, agent: Agent) -> tuple[dict[str, Any], SessionGrant]:
    """§2.1 subject_token: one of our session tokens, of this agent, of a live grant."""
    try:
        claims = verify(token, typ=SESSION_TOKEN_TYP, verify_exp=False)
    except TokenInvalid as exc:
        raise ExchangeError("invalid_grant", f"subject_token is not a valid session token ({exc})") from exc
    if claims["exp"] + countersign_settings.EXCHANGE_GRACE_SECONDS < time.time():
        raise ExchangeError("invalid_grant", "subject_token expired too long ago: the user must consent again")
    if claims.get("client_id") != agent.client_id:
        raise ExchangeError("invalid_grant", "subject_token was issued to another agent")
    row = AccessToken.objects.select_related("session_grant").filter(
        token_checksum=hashlib.sha256(token.encode()).hexdigest()).first()
    if row is None or str(row.session_grant_id) != claims.get("grant_id"):
        raise ExchangeError("invalid_grant", "subject_token is unknown")
    grant = row.session_grant
    if not grant.is_live():
        raise ExchangeError("invalid_grant", f"the session grant is {grant.status if grant.status != 'active' else 'expired'}")
    return claims, grant


def _narrowed_scopes(requested: str, audience: str, current: list[str]) -> list[str]:
    scopes = requested.split() if requested else list(current)
    wider = sorted(set(scopes) - set(current))
    if wider:
        raise ExchangeError("invalid_scope", f"cannot widen the token: {' '.join(wider)} not in subject_token")
    if audience:
        wanted = set(audience.split())
        by_scope = dict(ScopePolicy.objects.filter(name__in=scopes).values_list("name", "audience"))
        unknown = wanted - set(by_scope.values())
        if unknown:
            raise ExchangeError("invalid_target", f"audience not covered by the subject token: {' '.join(sorted(unknown))}")
        scopes = [s for s in scopes if by_scope.get(s) in wanted]
    return scopes


def _delegate(request, parent: Agent, grant: SessionGrant) -> Agent:
    actor_token, actor_type = _param(request, "actor_token"), _param(request, "actor_token_type")
    if actor_type != TOKEN_TYPE_JWT:
        raise ExchangeError("invalid_request", f"actor_token_type must be {TOKEN_TYPE_JWT}")
    try:
        sub_id = unverified_issuer(actor_token)
        sub_agent = Agent.objects.filter(client_id=sub_id).first()
        if sub_agent is None or not sub_agent.is_active:
            raise ExchangeError("invalid_grant", "actor_token names no active registered agent")
        verify_assertion(actor_token, agent=sub_agent, endpoint_url=request.uri)
    except AssertionInvalid as exc:
        raise ExchangeError("invalid_grant", f"actor_token rejected: {exc}") from exc
    if sub_id == parent.client_id:
        raise ExchangeError("invalid_request", "an agent does not delegate to itself; omit actor_token to re-mint")
    if sub_id not in (parent.delegates or []) or sub_id not in (grant.permitted_delegates or []):
        raise ExchangeError("unauthorized_client", "the user did not permit delegation to this agent")
    return sub_agent


def exchange(request) -> dict[str, Any]:
    agent: Agent = request.client
    if getattr(request, "client_auth_method", "") != "private_key_jwt":
        raise ExchangeError("unauthorized_client", "token exchange needs private_key_jwt client authentication", 400)
    if _param(request, "subject_token_type") not in SUBJECT_TOKEN_TYPES:
        raise ExchangeError("invalid_request", "subject_token_type must be an access_token or jwt token type")
    requested_type = _param(request, "requested_token_type")
    if requested_type and requested_type not in SUBJECT_TOKEN_TYPES:
        raise ExchangeError("invalid_request", "only access tokens can be requested")
    if not _param(request, "subject_token"):
        raise ExchangeError("invalid_request", "subject_token is required")
    claims, grant = _subject(_param(request, "subject_token"), agent)
    scopes = _narrowed_scopes(_param(request, "scope"), _param(request, "audience"), claims["scope"].split())
    chain: dict[str, Any] = claims["act"]
    holder = agent
    if not _param(request, "actor_token") and agent.refresh_mode != Agent.RefreshMode.EXCHANGE:
        raise ExchangeError("unauthorized_client",
                            f"this agent's refresh mode ({agent.refresh_mode}) does not allow re-minting by exchange")
    if _param(request, "actor_token"):
        holder = _delegate(request, agent, grant)
        scopes = [s for s in scopes if s in (holder.allowed_scopes or [])]
        chain = {"sub": actor_id(holder.client_id), "act": claims["act"]}
    if not scopes:
        raise ExchangeError("invalid_scope", "nothing left to grant after narrowing")
    remaining = int((grant.expires_at - timezone.now()).total_seconds())
    ttl = max(1, min(holder.access_token_ttl, remaining))
    new_claims = session_claims(grant=grant, client_id=holder.client_id, scopes=scopes, expires_in=ttl)
    new_claims["act"] = chain
    bind_to_proof_key(new_claims)
    token = sign(new_claims, typ=SESSION_TOKEN_TYP)
    with transaction.atomic():
        row = AccessToken(user_id=grant.user_id, scope=" ".join(scopes), application=holder, session_grant=grant,
                          jti=new_claims["jti"], expires=timezone.now() + timedelta(seconds=ttl))
        set_token_value(row, token)
        row.save()
        audit_record(event="token.delegated" if holder is not agent else "token.exchanged",
                     actor=actor_id(agent.client_id), user_id=grant.user_id, client_id=holder.client_id,
                     grant_id=grant.pk, detail={"jti": new_claims["jti"], "scope": " ".join(scopes),
                                                "subject_jti": claims["jti"], "act": chain, "expires_in": ttl})
    return {"access_token": token, "issued_token_type": TOKEN_TYPE_ACCESS, "token_type": token_type(),
            "expires_in": ttl, "scope": " ".join(scopes)}


class TokenExchangeGrant(ExtensionGrant):
    def respond(self, request) -> dict[str, Any]:
        return exchange(request)

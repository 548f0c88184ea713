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

An instance of the agent (``consent.instances``) authenticates with its Client Attestation instead
of a ``private_key_jwt`` assertion (the agent's key vouches for the instance key, the PoP proves
it). It re-mints only its own tokens (the new one names it again in ``act.instance``), or
**joins** the grant with a session token of the agent as one (no ``act.instance``): the agent hands
its token to one of its instances. Joining works in every refresh mode; outside ``exchange`` mode it
needs a live subject token and the instance's token lives no longer than it.
"""

import time
from typing import Any

from django.utils import timezone

from audit.services import audit_event

from .. import rows
from ..conf import countersign_settings
from ..errors import (
    ActorTokenInvalid,
    GrantInactive,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    SubjectTokenInvalid,
    UnauthorizedClient,
)
from ..instances import instance_of
from ..models import AccessToken, Agent, ScopePolicy, SessionGrant
from ..oauth.client_auth import ATTEST, PRIVATE_KEY_JWT
from ..oauth.private_key_jwt import AssertionInvalid, unverified_issuer, verify_assertion
from ..tokens import (
    SESSION_TOKEN_TYP,
    TokenInvalid,
    actor_id,
    bind_to_proof_key,
    session_claims,
    sign,
    token_checksum,
    token_type,
    verify,
)
from .issue import GRANT_COLUMNS, TokenRequest, access_token_row, live_grant, session_token_lifetime

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
SUBJECT_TOKEN_TYPES = (TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT)


_SUBJECT_GRANT = rows.Columns(SessionGrant, "g", [*GRANT_COLUMNS, "permitted_delegates"])


def _subject(token: str, agent: Agent) -> tuple[dict[str, Any], SessionGrant]:
    """§2.1 subject_token: one of our session tokens, of this agent, of a live grant."""
    try:
        claims = verify(token, typ=SESSION_TOKEN_TYP, verify_exp=False)
    except TokenInvalid as exc:
        raise SubjectTokenInvalid(f"subject_token is not a valid session token ({exc})") from exc
    if claims["exp"] + countersign_settings.EXCHANGE_GRACE_SECONDS < time.time():
        raise SubjectTokenInvalid("subject_token expired too long ago: the user must consent again")
    if claims.get("client_id") != agent.client_id:
        raise SubjectTokenInvalid("subject_token was issued to another agent")
    row = rows.fetchone(
        f"SELECT {_SUBJECT_GRANT.sql} FROM {rows.table(AccessToken)} t"
        f" JOIN {rows.table(SessionGrant)} g ON g.id = t.session_grant_id WHERE t.token_checksum = %s",
        [token_checksum(token)],
    )
    grant = rows.instance(SessionGrant, _SUBJECT_GRANT.load(row)) if row is not None else None
    if grant is None or str(grant.pk) != claims.get("grant_id"):
        raise SubjectTokenInvalid("subject_token is unknown")
    if not grant.is_live():
        raise GrantInactive(f"the session grant is {grant.status if grant.status != 'active' else 'expired'}")
    return claims, grant


def _narrowed_scopes(requested: str, audience: str, current: list[str]) -> list[str]:
    scopes = requested.split() if requested else list(current)
    wider = sorted(set(scopes) - set(current))
    if wider:
        raise InvalidScope(f"cannot widen the token: {' '.join(wider)} not in subject_token")
    if audience:
        wanted = set(audience.split())
        by_scope = dict(ScopePolicy.objects.filter(name__in=scopes).values_list("name", "audience"))
        unknown = wanted - set(by_scope.values())
        if unknown:
            raise InvalidTarget(f"audience not covered by the subject token: {' '.join(sorted(unknown))}")
        scopes = [s for s in scopes if by_scope.get(s) in wanted]
    return scopes


def _delegate(req: TokenRequest, parent: Agent, grant: SessionGrant) -> Agent:
    actor_token, actor_type = req.params.get("actor_token", ""), req.params.get("actor_token_type", "")
    if actor_type != TOKEN_TYPE_JWT:
        raise InvalidRequest(f"actor_token_type must be {TOKEN_TYPE_JWT}")
    try:
        sub_id = unverified_issuer(actor_token)
        sub_agent: Agent | None = Agent.objects.filter(client_id=sub_id).first()
        if sub_agent is None or not sub_agent.is_active:
            raise ActorTokenInvalid("actor_token names no active registered agent")
        verify_assertion(actor_token, agent=sub_agent, endpoint_url=req.uri)
    except AssertionInvalid as exc:
        raise ActorTokenInvalid(f"actor_token rejected: {exc}") from exc
    if sub_id == parent.client_id:
        raise InvalidRequest("an agent does not delegate to itself; omit actor_token to re-mint")
    if sub_id not in (parent.delegates or []) or sub_id not in (grant.permitted_delegates or []):
        raise UnauthorizedClient("the user did not permit delegation to this agent")
    return sub_agent


def exchange(req: TokenRequest) -> dict[str, Any]:
    """RFC 8693 §2.1 request, §2.2 response."""
    agent = req.authenticate()
    params = req.params
    if req.credentials.method not in (PRIVATE_KEY_JWT, ATTEST):
        raise UnauthorizedClient(
            "token exchange needs private_key_jwt (or an instance's attestation) client authentication"
        )
    if params.get("subject_token_type", "") not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest("subject_token_type must be an access_token or jwt token type")
    requested_type = params.get("requested_token_type", "")
    if requested_type and requested_type not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest("only access tokens can be requested")
    if not params.get("subject_token", ""):
        raise InvalidRequest("subject_token is required")
    claims, grant = _subject(params.get("subject_token", ""), agent)
    # An instance joins the grant with a token of the agent as one (the agent's key vouches for it);
    # a token of an instance is re-minted by that instance alone.
    joining = req.instance is not None and not instance_of(claims) and not params.get("actor_token", "")
    if not joining:
        req.check_instance(instance_of(claims))
    scopes = _narrowed_scopes(params.get("scope", ""), params.get("audience", ""), claims["scope"].split())
    chain: dict[str, Any] = {**claims["act"], "instance": req.instance_id} if joining else claims["act"]
    holder = agent
    re_mint = agent.refresh_mode == Agent.RefreshMode.EXCHANGE
    if joining and not re_mint and claims["exp"] <= time.time():
        raise SubjectTokenInvalid("an instance joins with a live token of its agent (this one expired)")
    if not params.get("actor_token", "") and not re_mint and not joining:
        raise UnauthorizedClient(
            f"this agent's refresh mode ({agent.refresh_mode}) does not allow re-minting by exchange"
        )
    if params.get("actor_token", ""):
        holder = _delegate(req, agent, grant)
        scopes = [s for s in scopes if s in (holder.allowed_scopes or [])]
        chain = {"sub": actor_id(holder.client_id), "act": claims["act"]}
    if not scopes:
        raise InvalidScope("nothing left to grant after narrowing")
    req.admit_instance(grant, timezone.now())
    ttl = session_token_lifetime(holder, grant, timezone.now())
    if (
        joining and not re_mint
    ):  # handing the token on, not re-minting it: it lives no longer than the agent's
        ttl = max(1, min(ttl, int(claims["exp"] - time.time())))
    new_claims = session_claims(grant=grant, client_id=holder.client_id, scopes=scopes, expires_in=ttl)
    new_claims["act"] = chain
    bind_to_proof_key(new_claims, jkt=req.dpop_jkt, grant_jkt=grant.dpop_jkt)
    token = sign(new_claims, typ=SESSION_TOKEN_TYP)
    now = timezone.now()
    batch = rows.Batch(live_grant(grant, now))
    batch.insert(
        "access_token",
        AccessToken,
        access_token_row(token, claims=new_claims, grant=grant, agent=holder, now=now),
    )
    batch.event(
        "audit",
        audit_event(
            event="token.delegated" if holder is not agent else "token.exchanged",
            actor=actor_id(agent.client_id),
            user_id=grant.user_id,
            client_id=holder.client_id,
            grant_id=grant.pk,
            detail={
                "jti": new_claims["jti"],
                "scope": " ".join(scopes),
                "subject_jti": claims["jti"],
                "act": chain,
                "expires_in": ttl,
                **({"instance": req.instance_id} if req.instance_id else {}),
            },
        ),
    )
    if batch.run() is None:
        raise GrantInactive("the session grant ended")
    return {
        "access_token": token,
        "issued_token_type": TOKEN_TYPE_ACCESS,
        "token_type": token_type(req.dpop_jkt),
        "expires_in": ttl,
        "scope": " ".join(scopes),
    }

"""JWT client authentication, ``private_key_jwt`` (RFC 7523 §2.2, §3; OpenID Connect Core §9).

https://www.rfc-editor.org/rfc/rfc7523

An agent that registered a JWK Set proves itself with a JWT it signs:
``iss`` = ``sub`` = its client id, ``aud`` = our issuer or the endpoint it calls,
a short ``exp``, and a ``jti`` never seen before (kept in Redis until the
assertion would have expired). The same check proves a sub-agent's identity in
an RFC 8693 ``actor_token``.
"""

import time
from functools import lru_cache
from typing import Any

import jwt
import redis
from django.conf import settings

from consent.limits.jsonbounds import JSONTooDeep, check_jwt

from ..conf import countersign_settings
from ..models import Agent

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALLOWED_ALGS = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
MAX_ASSERTION_BYTES = 8192


class AssertionInvalid(Exception):
    """Why an assertion was refused (for the audit row; the client only learns invalid_client)."""


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def accepted_audiences(endpoint_url: str | None = None) -> set[str]:
    issuer = countersign_settings.ISSUER
    audiences = {issuer, f"{issuer}/o/token/"}
    if endpoint_url:
        audiences.add(endpoint_url.split("?", 1)[0])
    return audiences


def _agent_key(agent: Agent, header: dict[str, Any]) -> Any:  # PyJWK's key: whichever kind the JWK holds
    keys = (agent.jwks or {}).get("keys") or []
    kid = header.get("kid")
    candidates = [k for k in keys if kid is None or k.get("kid") == kid]
    if not candidates:
        raise AssertionInvalid("no registered key matches the assertion's kid")
    if len(candidates) > 1:
        raise AssertionInvalid("several registered keys match: the assertion must name its kid")
    try:
        return jwt.PyJWK(candidates[0]).key
    except jwt.PyJWTError as exc:
        raise AssertionInvalid(f"registered key unusable: {exc}") from exc


def unverified_issuer(assertion: str) -> str:
    if not isinstance(assertion, str) or len(assertion) > MAX_ASSERTION_BYTES:
        raise AssertionInvalid("assertion missing or too large")
    try:
        check_jwt(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except (jwt.PyJWTError, JSONTooDeep) as exc:
        raise AssertionInvalid("malformed assertion") from exc
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or claims.get("sub") != issuer:
        raise AssertionInvalid("iss and sub must both be the client id")
    return issuer


def verify_assertion(assertion: str, *, agent: Agent, endpoint_url: str | None = None) -> dict[str, Any]:
    """Verify a ``private_key_jwt`` assertion for ``agent``; raises ``AssertionInvalid``."""
    if not agent.jwks:
        raise AssertionInvalid("the agent has no registered keys")
    try:
        check_jwt(assertion)
        header = jwt.get_unverified_header(assertion)
    except (jwt.PyJWTError, JSONTooDeep) as exc:
        raise AssertionInvalid("malformed assertion") from exc
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise AssertionInvalid(f"algorithm {alg!r} not allowed")
    key = _agent_key(agent, header)
    leeway = countersign_settings.LEEWAY_SECONDS
    try:
        claims = jwt.decode(
            assertion,
            key,
            algorithms=[alg],
            audience=list(accepted_audiences(endpoint_url)),
            issuer=agent.client_id,
            leeway=leeway,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except jwt.PyJWTError as exc:
        raise AssertionInvalid(f"assertion rejected: {exc}") from exc
    if claims["sub"] != agent.client_id:
        raise AssertionInvalid("sub must be the client id")
    now = time.time()
    lifetime = countersign_settings.CLIENT_ASSERTION_MAX_LIFETIME
    if claims["exp"] > now + lifetime + leeway:
        raise AssertionInvalid(f"assertion lives too long (exp more than {lifetime} s ahead)")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 8 <= len(jti) <= 200:
        raise AssertionInvalid("jti must be a string of 8 to 200 characters")
    ttl = max(1, int(claims["exp"] - now + leeway))
    if not _redis().set(f"countersign:jti:{agent.client_id}:{jti}", 1, nx=True, ex=ttl):
        raise AssertionInvalid("assertion replayed (jti already used)")
    return claims

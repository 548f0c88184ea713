"""OAuth 2.0 Attestation-Based Client Authentication, for agent instances.

https://datatracker.ietf.org/doc/draft-ietf-oauth-attestation-based-client-auth/

One registered agent may run many instances at once. Each instance holds a key of its own; the
agent (its backend, holding the key it registered in its JWKS) vouches for it with a **Client
Attestation** (§5.1), and the instance proves it holds that key with a **Client Attestation PoP**
(§5.2) on every request. Both travel in HTTP headers (§6.1):

- ``OAuth-Client-Attestation``: a JWT, ``typ: oauth-client-attestation+jwt``, signed by one of the
  agent's registered keys; ``iss`` = ``sub`` = the agent's client id (the agent is its own
  attester), ``exp`` (at most ``CLIENT_ATTESTATION_MAX_LIFETIME`` ahead), ``cnf.jwk`` = the
  instance's public key (RFC 7800), and Countersign's ``instance`` claim: the instance's id, which
  every token the instance gets carries as ``act.instance``.
- ``OAuth-Client-Attestation-PoP``: a JWT, ``typ: oauth-client-attestation-pop+jwt``, signed by
  the instance key; ``aud`` = our issuer (or the endpoint called), a fresh ``iat`` (at most
  ``CLIENT_ATTESTATION_POP_MAX_AGE`` seconds old), a ``jti`` never seen before (§11.2, kept in
  Redis), ``iss`` if present = the client id, ``instance`` if present = the attestation's.

This is the client authentication method ``attest_jwt_client_auth`` (§13.4). An instance that also
sends DPoP proofs (RFC 9449) makes them with the same key, so its tokens are bound to it. Every
failure is ``invalid_client`` for the client; why goes to the audit row (RFC 6749 §5.2).
"""

import re
import time
from dataclasses import dataclass
from typing import Any

import jwt

from consent.limits.jsonbounds import JSONTooDeep, check_jwt

from ..conf import countersign_settings
from ..keys import jwk_thumbprint
from ..models import Agent
from .private_key_jwt import ALLOWED_ALGS, AssertionInvalid, _agent_key, _redis, accepted_audiences

ATTEST_JWT_CLIENT_AUTH = "attest_jwt_client_auth"
ATTESTATION_HEADER = "OAuth-Client-Attestation"
POP_HEADER = "OAuth-Client-Attestation-PoP"
ATTESTATION_TYP = "oauth-client-attestation+jwt"
POP_TYP = "oauth-client-attestation-pop+jwt"
MAX_JWT_BYTES = 8192
INSTANCE_ID = re.compile(r"[A-Za-z0-9._~-]{1,64}")


@dataclass(frozen=True)
class InstanceProof:
    """What a verified attestation and its PoP establish: which instance, holding which key."""

    instance: str
    jkt: str  # RFC 7638 thumbprint of the instance key (cnf.jwk)


def _header(token: str, typ: str, what: str) -> dict[str, Any]:
    if not isinstance(token, str) or not token or len(token) > MAX_JWT_BYTES:
        raise AssertionInvalid(f"{what} missing or too large")
    try:
        check_jwt(token)
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, JSONTooDeep) as exc:
        raise AssertionInvalid(f"malformed {what}") from exc
    if header.get("typ") != typ:
        raise AssertionInvalid(f"{what} typ must be {typ}")
    if header.get("alg") not in ALLOWED_ALGS:
        raise AssertionInvalid(f"{what} algorithm {header.get('alg')!r} not allowed")
    return header


def unverified_client_id(attestation: str) -> str:
    """The attestation's ``sub``: which agent the request claims to be (checked by ``verify_instance``)."""
    _header(attestation, ATTESTATION_TYP, "client attestation")
    try:
        claims = jwt.decode(attestation, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AssertionInvalid("malformed client attestation") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AssertionInvalid("client attestation names no client (sub)")
    return sub


def _attestation(attestation: str, agent: Agent) -> tuple[dict[str, Any], dict[str, Any]]:
    """§5.1: signed by a key the agent registered, for this agent, short-lived; (claims, cnf.jwk)."""
    if not agent.jwks:
        raise AssertionInvalid("the agent has no registered keys to vouch for an instance")
    header = _header(attestation, ATTESTATION_TYP, "client attestation")
    key = _agent_key(agent, header)
    leeway = countersign_settings.LEEWAY_SECONDS
    try:
        claims: dict[str, Any] = jwt.decode(
            attestation,
            key,
            algorithms=[header["alg"]],
            issuer=agent.client_id,
            leeway=leeway,
            options={"require": ["iss", "sub", "exp", "cnf"], "verify_aud": False},
        )
    except jwt.PyJWTError as exc:
        raise AssertionInvalid(f"client attestation rejected: {exc}") from exc
    if claims["sub"] != agent.client_id:
        raise AssertionInvalid("client attestation sub must be the client id")
    lifetime = countersign_settings.CLIENT_ATTESTATION_MAX_LIFETIME
    if claims["exp"] > time.time() + lifetime + leeway:
        raise AssertionInvalid(f"client attestation lives too long (exp more than {lifetime} s ahead)")
    instance = claims.get("instance")
    if not isinstance(instance, str) or not INSTANCE_ID.fullmatch(instance):
        raise AssertionInvalid("client attestation needs an instance claim (1 to 64 of A-Z a-z 0-9 . _ ~ -)")
    cnf = claims["cnf"]
    jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
    if not isinstance(jwk, dict) or any(private in jwk for private in ("d", "p", "q", "k")):
        raise AssertionInvalid("client attestation cnf must carry the instance's public jwk")
    return claims, jwk


def _pop(pop: str, *, jwk: dict[str, Any], agent: Agent, instance: str, endpoint_url: str | None) -> None:
    """§5.2: signed by the attested instance key, for us, fresh, never replayed (§11.2)."""
    header = _header(pop, POP_TYP, "client attestation PoP")
    try:
        key = jwt.PyJWK(jwk, algorithm=header["alg"]).key
        claims: dict[str, Any] = jwt.decode(
            pop,
            key,
            algorithms=[header["alg"]],
            audience=list(accepted_audiences(endpoint_url)),
            options={"require": ["aud", "jti", "iat"], "verify_iat": False},
        )
    except jwt.InvalidAudienceError as exc:
        raise AssertionInvalid("client attestation PoP is for another audience") from exc
    except (jwt.PyJWTError, ValueError) as exc:
        raise AssertionInvalid(
            f"client attestation PoP rejected (not signed by the attested key?): {exc}"
        ) from exc
    if "iss" in claims and claims["iss"] != agent.client_id:
        raise AssertionInvalid("client attestation PoP iss must be the client id")
    if "instance" in claims and claims["instance"] != instance:
        raise AssertionInvalid("client attestation PoP names another instance than its attestation")
    iat, max_age = claims["iat"], countersign_settings.CLIENT_ATTESTATION_POP_MAX_AGE
    if not isinstance(iat, int | float) or abs(time.time() - iat) > max_age:
        raise AssertionInvalid("client attestation PoP is stale or from the future")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 8 <= len(jti) <= 200:
        raise AssertionInvalid("client attestation PoP jti must be a string of 8 to 200 characters")
    if not _redis().set(f"countersign:attest:{agent.client_id}:{jti}", 1, nx=True, ex=2 * max_age):
        raise AssertionInvalid("client attestation PoP replayed (jti already used)")


def verify_instance(
    attestation: str, pop: str, *, agent: Agent, endpoint_url: str | None = None
) -> InstanceProof:
    """Check an attestation and its PoP for ``agent``; raises ``AssertionInvalid``."""
    claims, jwk = _attestation(attestation, agent)
    _pop(pop, jwk=jwk, agent=agent, instance=claims["instance"], endpoint_url=endpoint_url)
    try:
        jkt = jwk_thumbprint(jwk)
    except ValueError as exc:
        raise AssertionInvalid(f"client attestation cnf jwk unusable: {exc}") from exc
    return InstanceProof(instance=claims["instance"], jkt=jkt)

"""JWT access tokens (RFC 9068) carrying the agent as actor (RFC 8693 §4.1).

A session access token names the user in ``sub`` and the agent in ``act``; its
``scope`` holds only the grant's standard scopes (a step-up scope never rides on
the blanket grant). Verification follows RFC 8725: an algorithm allow-list, an
explicit ``typ`` per token kind, and ``iss``/``aud``/``exp``/``iat``/``jti``/``sub``
required.
"""

import base64
import hashlib
import json
import secrets
import time
from functools import lru_cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.types import Options

from consent.limits.jsonbounds import JSONTooDeep, check_jwt

from .conf import countersign_settings
from .keys import SUPPORTED_ALGS, active_signing_key, verification_key
from .models import ScopePolicy, SessionGrant

SESSION_TOKEN_TYP = "at+jwt"
ACTION_TOKEN_TYP = "action+jwt"
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti"]
MAX_TOKEN_BYTES = 8192


class TokenInvalid(Exception):
    """The token is not one we issued, is malformed, or is expired (detail in ``str``)."""


def token_checksum(token: str) -> str:
    """How token rows are found: SHA-256 of the token (DOT's ``token_checksum``)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def subject_id(user_pk: Any) -> str:
    return f"user:{user_pk}"


def actor_id(client_id: str) -> str:
    return f"agent:{client_id}"


_audiences: tuple[float, dict[str, str]] = (0.0, {})


def audiences_for(scopes: list[str]) -> list[str]:
    """Audiences of the scopes' systems; the scope -> audience map is re-read every few seconds."""
    global _audiences
    expires, by_scope = _audiences
    if expires <= time.monotonic() or any(s not in by_scope for s in scopes):
        by_scope = dict(ScopePolicy.objects.values_list("name", "audience"))
        _audiences = (time.monotonic() + countersign_settings.SIGNING_KEY_CACHE_SECONDS, by_scope)
    return sorted({by_scope[s] for s in scopes if s in by_scope})


def forget_audiences() -> None:
    global _audiences
    _audiences = (0.0, {})


def amr_claims(grant: SessionGrant) -> dict[str, Any]:
    claims: dict[str, Any] = {"auth_time": int(grant.auth_time.timestamp())}
    if grant.acr:
        claims["acr"] = grant.acr
    if grant.amr:
        claims["amr"] = list(grant.amr)
    return claims


def sign(claims: dict[str, Any], *, typ: str) -> str:
    """A JWS compact serialization (RFC 7515 §7.1) of ``claims`` under the active signing key.

    ES256 (RFC 7518 §3.4) is written out here: the protected header is the same few bytes for
    every token of a key and ``typ`` (made once), the signature is cryptography's, R || S. PyJWT
    does the same work through its generic path, about half of a token's signing cost; it signs
    every other algorithm. Its output and this verify alike (``verify``, any JOSE library).
    """
    key = active_signing_key()
    if key.alg != "ES256" or not isinstance(key.private_key, ec.EllipticCurvePrivateKey):
        return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ})
    signing_input = b"%s.%s" % (
        _protected_header(key.alg, key.kid, typ),
        _b64(json.dumps(claims, separators=(",", ":")).encode()),
    )
    r, s = decode_dss_signature(key.private_key.sign(signing_input, _ES256))
    return (signing_input + b"." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))).decode()


_ES256 = ec.ECDSA(hashes.SHA256())


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@lru_cache(maxsize=16)
def _protected_header(alg: str, kid: str, typ: str) -> bytes:
    return _b64(json.dumps({"alg": alg, "kid": kid, "typ": typ}, separators=(",", ":")).encode())


def session_claims(
    *,
    grant: SessionGrant,
    client_id: str,
    scopes: list[str],
    expires_in: int,
    audience: list[str] | None = None,
) -> dict[str, Any]:
    """``audience``: the RFC 8707 resources asked for (``consent.oauth.resource.narrow``); by default
    every audience of ``scopes``."""
    now = int(time.time())
    return {
        "iss": countersign_settings.ISSUER,
        "sub": subject_id(grant.user_id),
        "aud": audience if audience is not None else audiences_for(scopes),
        "client_id": client_id,
        "scope": " ".join(scopes),
        "act": {"sub": actor_id(client_id)},
        "grant_id": str(grant.pk),
        "jti": secrets.token_urlsafe(16),
        "iat": now,
        "exp": now + expires_in,
        **amr_claims(grant),
    }


def bind_to_proof_key(claims: dict[str, Any], *, jkt: str, grant_jkt: str) -> dict[str, Any]:
    """RFC 9449 §6.1: ``cnf.jkt`` when the token request carried a valid DPoP proof.

    ``grant_jkt`` is the grant's binding so far. The grant's first DPoP-bound token
    binds it; a grant that is bound refuses a token request without a proof
    (§5), so a session cannot quietly turn into a bearer one.
    """
    from .oauth.dpop import check_grant_binding

    check_grant_binding(jkt, grant_jkt)
    if jkt:
        claims["cnf"] = {"jkt": jkt}
        if not grant_jkt:
            SessionGrant.objects.filter(pk=claims["grant_id"], dpop_jkt="").update(dpop_jkt=jkt)
    return claims


def token_type(jkt: str) -> str:
    """RFC 9449 §5 / RFC 6750: a DPoP-bound token is of type DPoP, any other a Bearer token."""
    return "DPoP" if jkt else "Bearer"


def verify(token: str, *, typ: str, audience: str | None = None, verify_exp: bool = True) -> dict[str, Any]:
    """Verify one of our own JWTs. Raises ``TokenInvalid``.

    ``kid`` only ever selects from our own published keys; ``jku``/``x5u`` are ignored.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise TokenInvalid("token missing or too large")
    try:
        check_jwt(token)
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, JSONTooDeep) as exc:
        raise TokenInvalid("malformed token") from exc
    if header.get("typ") != typ:
        raise TokenInvalid(f"wrong token type (expected {typ})")
    alg = header.get("alg")
    if alg not in SUPPORTED_ALGS:
        raise TokenInvalid("algorithm not allowed")
    key = verification_key(header.get("kid"))
    if key is None or key.alg != alg:
        raise TokenInvalid("unknown signing key")
    options: Options = {"require": REQUIRED_CLAIMS, "verify_exp": verify_exp}
    if audience is None:
        options["verify_aud"] = False
    try:
        return jwt.decode(
            token,
            key.public_key,
            algorithms=[key.alg],
            issuer=countersign_settings.ISSUER,
            audience=audience,
            options=options,
            leeway=countersign_settings.LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenInvalid("token expired") from exc
    except jwt.PyJWTError as exc:
        raise TokenInvalid(f"invalid token: {exc}") from exc

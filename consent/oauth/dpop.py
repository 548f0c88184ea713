"""OAuth 2.0 Demonstrating Proof of Possession (DPoP), RFC 9449 — the token endpoint's side.

https://www.rfc-editor.org/rfc/rfc9449

A proof (§4.2) is a JWT in the ``DPoP`` header, signed with a private key whose
public half rides in its ``jwk`` header. We check it as §4.3 lists, require a
server nonce (§8), remember its ``jti`` (§11.1), and bind the issued token to
the key's RFC 7638 thumbprint with ``cnf.jkt`` (§6.1). Countersign adds one
rule: the key must be one the agent registered, so the token is bound to the
agent's registered identity, not merely to some key.
"""

import base64
import hashlib
import hmac
import time
from functools import lru_cache

import jwt
from django.conf import settings

from consent.limits.jsonbounds import JSONTooDeep, check_jwt

from ..errors import InvalidDPoPProof, UseDPoPNonce
from ..keys import jwk_thumbprint
from ..models import Agent
from .private_key_jwt import _redis

ALLOWED_ALGS = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
MAX_PROOF_BYTES = 8192
PROOF_MAX_AGE = 60
NONCE_WINDOW = 300


def _nonce_for(bucket: int) -> str:
    return _nonce(settings.SECRET_KEY, bucket)


@lru_cache(maxsize=8)
def _nonce(secret: str, bucket: int) -> str:
    """The HMAC once per window, not on every token response (each one carries the nonce)."""
    mac = hmac.new(secret.encode(), f"dpop-nonce:{bucket}".encode(), hashlib.sha256).digest()
    return f"{bucket}.{base64.urlsafe_b64encode(mac[:18]).decode()}"


def current_nonce() -> str:
    """A stateless server nonce (§8): valid for this window and the one before it."""
    return _nonce_for(int(time.time()) // NONCE_WINDOW)


def _nonce_ok(nonce: object) -> bool:
    if not isinstance(nonce, str):
        return False
    bucket = int(time.time()) // NONCE_WINDOW
    return any(hmac.compare_digest(nonce, _nonce_for(b)) for b in (bucket, bucket - 1))


def ath_for(access_token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(access_token.encode()).digest()).rstrip(b"=").decode()


def verify_proof(proof: str, *, htm: str, htu: str, access_token: str | None = None) -> str:
    """Check a DPoP proof (§4.3); return the RFC 7638 thumbprint of its key."""
    if not isinstance(proof, str) or not proof or len(proof) > MAX_PROOF_BYTES or "," in proof:
        raise InvalidDPoPProof("exactly one DPoP proof is required")
    try:
        check_jwt(proof)
        header = jwt.get_unverified_header(proof)
    except (jwt.PyJWTError, JSONTooDeep) as exc:
        raise InvalidDPoPProof("malformed DPoP proof") from exc
    if header.get("typ") != "dpop+jwt":
        raise InvalidDPoPProof("DPoP proof typ must be dpop+jwt")
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise InvalidDPoPProof("DPoP proof must use an asymmetric algorithm")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict) or "d" in jwk or "p" in jwk or "k" in jwk:
        raise InvalidDPoPProof("DPoP proof must carry a public jwk")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
        claims = jwt.decode(
            proof,
            key,
            algorithms=[alg],
            options={
                "require": ["jti", "htm", "htu", "iat"],
                "verify_aud": False,
                "verify_exp": False,
                "verify_iat": False,
            },
        )
        jkt = jwk_thumbprint(jwk)
    except (jwt.PyJWTError, ValueError) as exc:
        raise InvalidDPoPProof(f"DPoP proof signature invalid: {exc}") from exc
    if claims["htm"] != htm:
        raise InvalidDPoPProof("DPoP proof htm does not match the request method")
    if str(claims["htu"]).split("?", 1)[0].split("#", 1)[0] != htu:
        raise InvalidDPoPProof("DPoP proof htu does not match the request URL")
    iat = claims["iat"]
    if not isinstance(iat, int | float) or abs(time.time() - iat) > PROOF_MAX_AGE:
        raise InvalidDPoPProof("DPoP proof is stale or from the future")
    if access_token is not None and claims.get("ath") != ath_for(access_token):
        raise InvalidDPoPProof("DPoP proof ath does not match the access token")
    if not _nonce_ok(claims.get("nonce")):
        raise UseDPoPNonce("a fresh server nonce is required")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 8 <= len(jti) <= 200:
        raise InvalidDPoPProof("DPoP proof jti must be a string of 8 to 200 characters")
    if not _redis().set(f"countersign:dpop:{jkt}:{jti}", 1, nx=True, ex=2 * PROOF_MAX_AGE):
        raise InvalidDPoPProof("DPoP proof replayed")
    return jkt


def registered_thumbprints(agent: Agent) -> set[str]:
    prints = set()
    for key in (agent.jwks or {}).get("keys") or []:
        try:
            prints.add(jwk_thumbprint(key))
        except ValueError:
            continue
    return prints


def dpop_headers() -> dict[str, str]:
    return {"DPoP-Nonce": current_nonce()}


def check_agent_key(jkt: str, agent: Agent) -> None:
    """Countersign's rule on top of §5: a required proof, by one of the agent's registered keys."""
    if not jkt and agent.require_dpop:
        raise InvalidDPoPProof(
            "this agent must present a DPoP proof (RFC 9449)", reason="DPoP required for this agent"
        )
    if jkt and jkt not in registered_thumbprints(agent):
        raise InvalidDPoPProof(
            "the DPoP key is not one registered for this agent",
            reason="DPoP key not registered for this agent",
        )


def check_grant_binding(jkt: str, grant_jkt: str) -> None:
    """§5: a session that got a DPoP-bound token stays bound; no bearer tokens after."""
    if grant_jkt and not jkt:
        raise InvalidDPoPProof(
            "this session's tokens are DPoP-bound: present a DPoP proof",
            reason="DPoP-bound session without a proof",
        )

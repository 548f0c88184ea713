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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from jwt.types import Options

from consent.limits.jsonbounds import JSONTooDeep, check_jwt
from countersign.jsonbounds import depth_within

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
    A token of the shape ``sign`` writes (an ES256 JWS whose protected header holds exactly
    ``alg``, ``kid`` and ``typ``) is checked by ``_verify_es256``; any other goes through PyJWT,
    which refuses or accepts it as before (``tests/consent/test_token_verify.py`` holds the two
    to the same answers).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise TokenInvalid("token missing or too large")
    claims = _verify_es256(token, typ=typ, audience=audience, verify_exp=verify_exp)
    if claims is not None:
        return claims
    try:
        check_jwt(token)  # the ES256 path bounds the segments it decodes itself
    except JSONTooDeep as exc:
        raise TokenInvalid("malformed token") from exc
    return _verify_generic(token, typ=typ, audience=audience, verify_exp=verify_exp)


def _verify_generic(token: str, *, typ: str, audience: str | None, verify_exp: bool) -> dict[str, Any]:
    """Any algorithm we publish, any header: PyJWT's JWS and claim checks."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
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


# --- ES256, written out (RFC 7515 §5.2, RFC 7518 §3.4, RFC 7519 §7.2) --------------------------------

_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_PLAIN_HEADER = frozenset({"alg", "kid", "typ"})


def _unb64(segment: bytes) -> bytes:
    """RFC 7515 §2 base64url without padding, canonical (as PyJWT requires); ``ValueError`` otherwise.

    The alphabet is checked by one ``bytes.translate``; PyJWT checks it a character at a time
    in Python, twice per token (its header read and its decode): for an action token with its
    ``authorization_details``, more than the signature check itself.
    """
    if len(segment) % 4 == 1 or segment.translate(None, _B64URL_ALPHABET):
        raise ValueError("not base64url")
    decoded = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    if _b64(decoded) != segment:  # unused trailing bits set: not the one encoding of these bytes
        raise ValueError("not canonical base64url")
    return decoded


@lru_cache(maxsize=64)
def _plain_header(segment: bytes) -> tuple[str, str, str] | None:
    """(alg, kid, typ) of a protected header with exactly those members, all strings; else None.

    Every token of one key and kind has the same header bytes, so it is parsed once.
    """
    try:
        data = _unb64(segment)
        # Flat, or not a header of this shape: nothing nested reaches the parser (check_jwt's bound).
        header = json.loads(data) if depth_within(data, 1) else None
    except ValueError:
        return None
    if not isinstance(header, dict) or set(header) != _PLAIN_HEADER:
        return None
    alg, kid, typ = header["alg"], header["kid"], header["typ"]
    if not (isinstance(alg, str) and isinstance(kid, str) and isinstance(typ, str)):
        return None
    return alg, kid, typ


def recorded_claims(token: str, *, typ: str) -> dict[str, Any] | None:
    """The claims of one of our tokens, checked as ``verify`` checks them but for the signature.

    Only for a caller that goes on to prove the token is one we minted, byte for byte: its
    ``token_checksum`` equal to the one recorded when it was minted, in the same statement that
    acts on it (redemption). SHA-256 equality with a token we signed says everything the
    signature would (and more: the token was also recorded), for ~5,000 instructions instead
    of the ~830,000 of a P-256 verification (callgrind, ``bench/inprocess.py``).

    None wherever ``verify`` must decide: any token not of the shape ``sign`` writes, and any
    token ``verify`` would refuse for a reason other than its signature (the caller then calls
    ``verify``, which gives the refusal, in its order and words). The key named by ``kid`` must
    still be one we publish: a retired key's tokens are refused as before.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        return None
    try:
        return _verify_es256(token, typ=typ, audience=None, verify_exp=True, check_signature=False)
    except TokenInvalid:
        return None


def _verify_es256(
    token: str, *, typ: str, audience: str | None, verify_exp: bool, check_signature: bool = True
) -> dict[str, Any] | None:
    """The claims of an ES256 token of the shape ``sign`` writes; None for any other shape.

    The same checks, in the same order and with the same refusals, as ``check_jwt`` and
    ``_verify_generic``: the three segments decode and the claims nest no deeper than
    ``JWT_MAX_DEPTH`` (else "malformed"), then ``typ``, ``alg``, the key by ``kid``,
    the R || S signature over the first two segments (unless ``check_signature`` is False:
    ``recorded_claims``), the payload a JSON object, then the claims (``_check_claims``).
    """
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        return None
    segments = raw.split(b".")
    if len(segments) != 3 or b"=" in raw:  # padded segments: PyJWT's to accept or refuse
        return None
    header = _plain_header(segments[0])
    if header is None or header[0] != "ES256":
        return None
    try:
        payload, signature = _unb64(segments[1]), _unb64(segments[2])
    except ValueError:
        raise TokenInvalid("malformed token") from None
    if not depth_within(payload, countersign_settings.JWT_MAX_DEPTH):  # check_jwt's bound, decoded once
        raise TokenInvalid("malformed token")
    alg, kid, header_typ = header
    if header_typ != typ:
        raise TokenInvalid(f"wrong token type (expected {typ})")
    key = verification_key(kid)
    if key is None or key.alg != alg:
        raise TokenInvalid("unknown signing key")
    public_key = key.public_key
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        return None
    if len(signature) != 64:
        raise TokenInvalid("invalid token: Signature verification failed")
    if check_signature:
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            public_key.verify(der, raw[: len(segments[0]) + 1 + len(segments[1])], _ES256)
        except InvalidSignature:
            raise TokenInvalid("invalid token: Signature verification failed") from None
    try:
        claims = json.loads(payload)
    except ValueError as exc:
        raise TokenInvalid(f"invalid token: Invalid payload string: {exc}") from None
    if not isinstance(claims, dict):
        raise TokenInvalid("invalid token: Invalid payload string: must be a json object")
    _check_claims(claims, audience=audience, verify_exp=verify_exp)
    return claims


def _numeric_date(claims: dict[str, Any], name: str, refusal: str) -> int:
    try:
        return int(claims[name])
    except (ValueError, TypeError, OverflowError):
        raise TokenInvalid(f"invalid token: {refusal}") from None


def _check_claims(claims: dict[str, Any], *, audience: str | None, verify_exp: bool) -> None:
    """RFC 7519 §4.1 as ``_verify_generic`` applies it (PyJWT's checks, in its order and words)."""
    for name in REQUIRED_CLAIMS:
        if claims.get(name) is None:
            raise TokenInvalid(f'invalid token: Token is missing the "{name}" claim')
    now, leeway = time.time(), countersign_settings.LEEWAY_SECONDS
    if _numeric_date(claims, "iat", "Issued At claim (iat) must be an integer.") > now + leeway:
        raise TokenInvalid("invalid token: The token is not yet valid (iat)")
    if (
        "nbf" in claims
        and _numeric_date(claims, "nbf", "Not Before claim (nbf) must be an integer.") > now + leeway
    ):
        raise TokenInvalid("invalid token: The token is not yet valid (nbf)")
    if (
        verify_exp
        and _numeric_date(claims, "exp", "Expiration Time claim (exp) must be an integer.") <= now - leeway
    ):
        raise TokenInvalid("token expired")
    if not isinstance(claims["iss"], str):
        raise TokenInvalid("invalid token: Payload Issuer (iss) must be a string")
    if claims["iss"] != countersign_settings.ISSUER:
        raise TokenInvalid("invalid token: Invalid issuer")
    if audience is not None:
        if not claims["aud"]:
            raise TokenInvalid('invalid token: Token is missing the "aud" claim')
        audiences = [claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"]
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise TokenInvalid("invalid token: Invalid claim format in token")
        if audience not in audiences:
            raise TokenInvalid("invalid token: Audience doesn't match")
    if not isinstance(claims["sub"], str):
        raise TokenInvalid("invalid token: Subject must be a string")
    if not isinstance(claims["jti"], str):
        raise TokenInvalid("invalid token: JWT ID must be a string")

"""Offline verification of Countersign receipts (``typ: receipt+jwt``).

A receipt is a JWS (RFC 7515) signed by the authorization server's key after an action token
was redeemed: who the user is (``sub``), which agent acted (``act``, RFC 8693 §4.1), who approved
and how they authenticated (``approver``: ``sub``, RFC 8176 ``amr``, ``auth_time``), exactly what
(RFC 9396 ``authorization_details`` and its ``action_hash``), when (``approved_at``,
``redeemed_at``) and where (``resource_server``). Verify it with a JWKS you saved from the
issuer's ``jwks_uri``: nothing is fetched (RFC 8725 §3.10: ``jku``/``x5u`` are ignored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jwt

from .errors import InvalidToken
from .jsonbounds import jws_within
from .verifier import ALGORITHMS, action_hash

RECEIPT_TYP = "receipt+jwt"
REQUIRED = [
    "iss",
    "iat",
    "jti",
    "sub",
    "act",
    "approver",
    "authorization_details",
    "action_hash",
    "approval_id",
    "redeemed_at",
    "resource_server",
]
MAX_RECEIPT_BYTES = 32 * 1024
_DEFAULT_ALG = {("EC", "P-256"): "ES256", ("RSA", None): "RS256"}


class InvalidReceipt(InvalidToken):
    """The receipt does not verify: malformed, not a receipt, unknown key, bad signature, wrong
    issuer, or its ``action_hash`` is not that of its ``authorization_details``."""


def _keys(jwks: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    keys: dict[str, tuple[Any, str]] = {}
    for jwk in jwks.get("keys") or []:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
            continue
        alg = jwk.get("alg") or _DEFAULT_ALG.get((str(jwk.get("kty")), jwk.get("crv")))
        if alg not in ALGORITHMS:
            continue
        try:
            keys[jwk["kid"]] = (jwt.PyJWK(jwk, algorithm=alg).key, alg)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
    return keys


def verify_receipt(
    receipt: str, *, jwks: Mapping[str, Any], issuer: str, algorithms: Sequence[str] = ALGORITHMS
) -> dict[str, Any]:
    """The receipt's claims if it verifies against ``jwks`` and names ``issuer``; else :class:`InvalidReceipt`."""
    receipt = receipt.strip() if isinstance(receipt, str) else ""
    if not receipt or len(receipt) > MAX_RECEIPT_BYTES or not jws_within(receipt):
        raise InvalidReceipt("not a receipt (empty, too large or too deeply nested)")
    try:
        header = jwt.get_unverified_header(receipt)
    except jwt.PyJWTError as exc:
        raise InvalidReceipt("malformed receipt") from exc
    if header.get("typ") != RECEIPT_TYP:
        raise InvalidReceipt(f"not a receipt (typ {header.get('typ')!r}, expected {RECEIPT_TYP})")
    alg = header.get("alg")
    if alg not in algorithms:
        raise InvalidReceipt("algorithm not allowed")
    kid = header.get("kid")
    entry = _keys(jwks).get(kid) if isinstance(kid, str) else None
    if entry is None or entry[1] != alg:
        raise InvalidReceipt("signed by a key that is not in this JWKS")
    try:
        claims: dict[str, Any] = jwt.decode(
            receipt,
            entry[0],
            algorithms=[alg],
            issuer=issuer,
            options={"require": REQUIRED, "verify_aud": False, "verify_exp": False},
        )
    except jwt.PyJWTError as exc:
        raise InvalidReceipt(f"the receipt does not verify: {exc}") from exc
    details = claims["authorization_details"]
    if not isinstance(details, list) or claims["action_hash"] != action_hash(details):
        raise InvalidReceipt("action_hash is not that of the receipt's authorization_details")
    return claims


def load_jwks(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set (an object with a keys array)")
    return data

"""Signing keys and the JWKS (RFC 7517).

Keys live in the database so every process signs with the same active key. A
process keeps a ``kid`` -> key map and re-reads the active key at most every
``SIGNING_KEY_CACHE_SECONDS``. Rotation retires the active key but keeps it in
the JWKS until every token it can have signed has expired.
"""

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.db import IntegrityError, transaction
from django.db.models import Max, Q, QuerySet
from django.utils import timezone
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .conf import countersign_settings
from .models import Agent, ScopePolicy, SigningKey

SUPPORTED_ALGS = ("ES256", "RS256")
# What _generate makes, and so what the database holds.
SigningPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
SigningPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class LoadedKey:
    kid: str
    alg: str
    private_key: SigningPrivateKey
    public_key: SigningPublicKey


_lock = threading.Lock()
_by_kid: dict[str, LoadedKey] = {}  # parsed key material; a kid's key never changes
_published: dict[str, float] = {}  # kid -> until when (monotonic) we trust it is still published
_active: tuple[float, LoadedKey] | None = None


def jwk_thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url). Raises ValueError for an unusable key."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}.get(
        str(public_jwk.get("kty"))
    )
    if members is None or any(not isinstance(public_jwk.get(m), str) for m in members):
        raise ValueError("not a usable public JWK")
    canonical = json.dumps({k: public_jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _generate(alg: str) -> tuple[str, dict[str, Any]]:
    private: SigningPrivateKey
    if alg == "ES256":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        private, public_jwk = ec_key, json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    elif alg == "RS256":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private, public_jwk = rsa_key, json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    kid = jwk_thumbprint(public_jwk)
    public_jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return pem, public_jwk


def _load(row: SigningKey) -> LoadedKey:
    cached = _by_kid.get(row.kid)
    if cached is not None:
        return cached
    # An EC or RSA key: the only kinds _generate makes.
    private = cast(
        SigningPrivateKey, serialization.load_pem_private_key(row.private_pem.encode(), password=None)
    )
    loaded = LoadedKey(row.kid, row.alg, private, private.public_key())
    _by_kid[row.kid] = loaded
    return loaded


def _longest_token_lifetime() -> timedelta:
    """Upper bound on how long a token signed now can stay valid."""
    agent_ttl = Agent.objects.aggregate(m=Max("access_token_ttl"))["m"] or 0
    action_ttl = ScopePolicy.objects.aggregate(m=Max("action_token_ttl"))["m"] or 0
    longest = max(agent_ttl, action_ttl, countersign_settings.DEFAULT_ACCESS_TOKEN_TTL)
    slack = countersign_settings.SIGNING_KEY_CACHE_SECONDS + countersign_settings.LEEWAY_SECONDS
    return timedelta(seconds=longest + slack)


def signing_key_create(*, alg: str | None = None) -> SigningKey:
    """Make a new active key; retire the current one (kept published until its tokens expire)."""
    global _active
    alg = alg or countersign_settings.SIGNING_ALG
    pem, public_jwk = _generate(alg)
    now = timezone.now()
    with transaction.atomic():
        SigningKey.objects.filter(active=True).update(
            active=False, retired_at=now, publish_until=now + _longest_token_lifetime()
        )
        key = SigningKey.objects.create(
            kid=public_jwk["kid"], alg=alg, private_pem=pem, public_jwk=public_jwk, active=True
        )
    with _lock:
        _active = None
        _published.clear()
    return key


def active_signing_key() -> LoadedKey:
    """The key to sign with now, created on first use."""
    global _active
    cached = _active
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    row = SigningKey.objects.filter(active=True).first()
    if row is None:
        try:
            row = signing_key_create()
        except IntegrityError:  # another process created it first
            row = SigningKey.objects.get(active=True)
    loaded = _load(row)
    with _lock:
        _active = (time.monotonic() + countersign_settings.SIGNING_KEY_CACHE_SECONDS, loaded)
    return loaded


def verification_key(kid: object) -> LoadedKey | None:
    """The published key with this ``kid``, or None. ``kid`` is untrusted: only a dict/DB lookup.

    A key is trusted exactly while the JWKS publishes it; whether it still is, is
    re-read from the database at most every ``SIGNING_KEY_CACHE_SECONDS``.
    """
    if not isinstance(kid, str) or len(kid) > 64:
        return None
    now = time.monotonic()
    if _published.get(kid, 0) > now:
        return _by_kid[kid]
    row = published_keys().filter(kid=kid).first()
    if row is None:
        _published.pop(kid, None)
        return None
    loaded = _load(row)
    _published[kid] = now + countersign_settings.SIGNING_KEY_CACHE_SECONDS
    return loaded


def published_keys() -> QuerySet[SigningKey]:
    return SigningKey.objects.filter(Q(active=True) | Q(publish_until__gt=timezone.now()))


def jwks() -> dict[str, Any]:
    active_signing_key()  # a fresh install publishes a key before it signs anything
    return {"keys": [k.public_jwk for k in published_keys().order_by("-created")]}


def reset_key_cache() -> None:
    global _active
    with _lock:
        _active = None
        _by_kid.clear()
        _published.clear()


class ServerSigner:
    """The server's keys as the audit ledger signs checkpoints with them (``audit.keys``)."""

    def issuer(self) -> str:
        return str(countersign_settings.ISSUER)

    def active_key(self) -> LoadedKey:
        return active_signing_key()

    def jwks(self) -> dict[str, Any]:
        """Every key this server ever signed with, published or not: the server checks its own
        history. (An outside auditor uses the JWKS it kept, which is the point of keeping it.)"""
        return {"keys": list(SigningKey.objects.values_list("public_jwk", flat=True))}

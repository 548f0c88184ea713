"""OAuth 2.0 Demonstrating Proof of Possession (DPoP), RFC 9449: proofs made and checked.

https://www.rfc-editor.org/rfc/rfc9449

An agent holding a DPoP key sends, with every token request and every use of a
DPoP-bound token, a fresh proof JWT (§4.2): header ``typ: dpop+jwt``, an
asymmetric ``alg`` and the public ``jwk``; claims ``jti``, ``htm``, ``htu``,
``iat``, plus ``ath`` (§4.2, hash of the access token) when presenting a token
and ``nonce`` when the server asked for one (§8, §9). The token it gets carries
``cnf.jkt``, the RFC 7638 thumbprint of that key (§6.1).

:func:`verify_proof` performs the §4.3 checks a resource server must make.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from .errors import InvalidDPoPProof
from .jsonbounds import jws_within

__all__ = [
    "DPOP_ALGS",
    "DPoPKey",
    "DPoPProof",
    "JtiStore",
    "ReplayCache",
    "access_token_hash",
    "jwk_thumbprint",
    "normalize_htu",
    "public_jwk",
    "verify_proof",
]

DPOP_TYP = "dpop+jwt"
#: Asymmetric algorithms accepted in proofs (§4.3 check 5; never ``none`` or an HMAC).
DPOP_ALGS: tuple[str, ...] = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
MAX_PROOF_BYTES = 4096
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
# Which JWK fits which algorithm (RFC 7518 §3.4, RFC 8037 §3.1).
_ALG_KEYS = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "RS256": ("RSA", None),
    "PS256": ("RSA", None),
    "EdDSA": ("OKP", None),
}

PrivateKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 §3 JWK SHA-256 thumbprint, base64url. Raises ``ValueError`` for an unusable key."""
    members = _THUMBPRINT_MEMBERS.get(cast(str, jwk.get("kty")))
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise ValueError("not a usable public JWK")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(access_token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url SHA-256 of the ASCII access token."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


@functools.lru_cache(maxsize=1024)
def normalize_htu(url: str) -> str:
    """The URI a proof's ``htu`` is compared on: no query, no fragment (§4.2), and
    scheme, host and default port normalised as RFC 3986 §6.2.2 and §6.2.3 allow (§4.3 check 9)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None and not ((scheme == "https" and port == 443) or (scheme == "http" and port == 80)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", "", ""))


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """The public JWK (RFC 7517) of a private key: only the public members."""
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        raw = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, rsa.RSAPublicKey):
        raw = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        raw = OKPAlgorithm.to_jwk(public, as_dict=True)
    members = _THUMBPRINT_MEMBERS[raw["kty"]]
    return {m: raw[m] for m in members}


def default_alg(key: PrivateKey) -> str:
    """ES256 for P-256, ES384 for P-384, RS256 for RSA, EdDSA for Ed25519/Ed448."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        if isinstance(key.curve, ec.SECP384R1):
            return "ES384"
        raise ValueError(f"unsupported curve {key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return "EdDSA"


class DPoPKey:
    """An agent's DPoP key pair and the proofs it signs (RFC 9449 §4.2)."""

    def __init__(self, private_key: PrivateKey, *, alg: str | None = None) -> None:
        self.private_key = private_key
        self.alg = alg or default_alg(private_key)
        if self.alg not in DPOP_ALGS:
            raise ValueError(f"{self.alg} is not a DPoP signing algorithm")
        self.jwk = public_jwk(private_key)
        #: RFC 7638 thumbprint: what a token bound to this key carries in ``cnf.jkt`` (§6.1).
        self.jkt = jwk_thumbprint(self.jwk)

    @classmethod
    def generate(cls) -> DPoPKey:
        """A fresh P-256 key (ES256)."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def proof(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: int | None = None,
        jti: str | None = None,
    ) -> str:
        """A DPoP proof JWT for one HTTP request (§4.2).

        ``htu`` may carry a query or fragment; they are dropped as §4.2 requires.
        ``access_token`` adds ``ath`` (required when presenting a bound token, §7.1);
        ``nonce`` echoes the server's ``DPoP-Nonce`` (§8.1, §9).
        """
        parts = urlsplit(htu)
        claims: dict[str, Any] = {
            "jti": jti or secrets.token_urlsafe(16),
            "htm": htm.upper(),
            "htu": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
            "iat": int(time.time()) if iat is None else iat,
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        return jwt.encode(
            claims, self.private_key, algorithm=self.alg, headers={"typ": DPOP_TYP, "jwk": self.jwk}
        )


class JtiStore(Protocol):
    """Where seen proof ``jti`` values are kept (§11.1). :class:`ReplayCache` is in-process;
    several processes behind one load balancer need a shared one (e.g. Redis ``SET NX EX``)."""

    def add(self, key: str) -> bool:
        """Record ``key``; False if it was already there."""
        ...


class ReplayCache:
    """Seen ``jti`` values of DPoP proofs, kept for ``ttl`` seconds (§11.1), thread-safe.

    Entries expire in insertion order (one TTL for all), so purging is a pop from
    the front. When full of unexpired entries it refuses new proofs rather than
    forget old ones (failing closed).
    """

    def __init__(self, ttl: float, *, max_entries: int = 1_000_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: str) -> bool:
        """Record ``key``; False if it was already seen (a replay) or the cache is full."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen
            while seen:
                oldest_key, expires = next(iter(seen.items()))
                if expires > now:
                    break
                del seen[oldest_key]
            if key in seen or len(seen) >= self.max_entries:
                return False
            seen[key] = now + self.ttl
            return True


@dataclass(frozen=True)
class DPoPProof:
    """A verified proof: the key it was signed with (``jkt``) and its claims."""

    jkt: str
    jti: str
    htm: str
    htu: str
    iat: int
    claims: dict[str, Any]


_MAX_CACHED_HEADERS = 4096
# iat is checked below, both ways (§4.3 check 11); a proof has no aud, iss or exp.
_PROOF_OPTIONS: Any = {
    "require": ["jti", "htm", "htu", "iat"],
    "verify_aud": False,
    "verify_iss": False,
    "verify_iat": False,
    "verify_exp": False,
    "verify_nbf": False,
}
# A key signs every proof with the same JOSE header, so its checks, thumbprint and key object
# are computed once per distinct header segment (bounded; only headers that passed are kept).
_headers: dict[str, tuple[str, str, Any]] = {}  # header segment -> (alg, jkt, public key)
_headers_lock = threading.Lock()


def _b64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def _proof_header(segment: str) -> tuple[str, str, Any]:
    """§4.3 checks 3-6 on the header: ``typ``, an asymmetric ``alg``, a public ``jwk``."""
    cached = _headers.get(segment)
    if cached is not None:
        return cached
    try:
        header = _b64json(segment)
    except (ValueError, binascii.Error) as exc:
        raise InvalidDPoPProof("the DPoP proof is malformed", dpop=True) from exc
    if not isinstance(header, dict):
        raise InvalidDPoPProof("the DPoP proof is malformed", dpop=True)
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != DPOP_TYP:
        raise InvalidDPoPProof("the DPoP proof's typ must be dpop+jwt", dpop=True)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in _ALG_KEYS:
        raise InvalidDPoPProof("the DPoP proof's alg is not an allowed asymmetric algorithm", dpop=True)
    jwk = header.get("jwk")
    if not isinstance(jwk, dict) or _PRIVATE_MEMBERS & jwk.keys():
        raise InvalidDPoPProof("the DPoP proof needs a public jwk header", dpop=True)
    if "crit" in header:
        raise InvalidDPoPProof(
            "the DPoP proof has critical header parameters we do not understand", dpop=True
        )
    try:
        jkt = jwk_thumbprint(jwk)
    except ValueError as exc:
        raise InvalidDPoPProof("the proof's jwk is not a usable public key", dpop=True) from exc
    kty, crv = _ALG_KEYS[alg]
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
        raise InvalidDPoPProof(f"the proof's jwk does not fit alg {alg}", dpop=True)
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise InvalidDPoPProof("the proof's jwk is not a usable public key", dpop=True) from exc
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidDPoPProof("the proof's RSA key is shorter than 2048 bits", dpop=True)
    entry = (alg, jkt, key)
    with _headers_lock:
        if len(_headers) < _MAX_CACHED_HEADERS:
            _headers[segment] = entry
    return entry


def verify_proof(
    proof: str | None,
    *,
    htm: str,
    htu: str,
    access_token: str | None = None,
    expected_jkt: str | None = None,
    nonce: str | None = None,
    max_age: float = 60.0,
    algorithms: Sequence[str] = DPOP_ALGS,
    replay_cache: JtiStore | None = None,
    now: float | None = None,
) -> DPoPProof:
    """Check a DPoP proof as RFC 9449 §4.3 lists, raising :class:`InvalidDPoPProof`.

    1-2. one well-formed JWT; 3. required header fields and claims; 4. ``typ`` is
    ``dpop+jwt``; 5. an asymmetric algorithm from ``algorithms``; 6. signature by
    the embedded public ``jwk`` (no private members); 7-8. ``htm`` and ``htu``
    match this request; 10. ``nonce`` if one is expected; 11. ``iat`` within
    ``max_age`` seconds of now (either way); 12. ``jti`` unseen (``replay_cache``);
    and, when presenting a token (§4.3 check 12, §7.1), ``ath`` matches it and the
    key's thumbprint equals ``expected_jkt`` (``cnf.jkt``).
    """
    if not isinstance(proof, str) or not proof:
        raise InvalidDPoPProof("a DPoP proof is required", dpop=True)
    if len(proof) > MAX_PROOF_BYTES or proof.count(".") != 2 or not proof.isascii() or not jws_within(proof):
        raise InvalidDPoPProof("the DPoP proof is not a compact JWS", dpop=True)
    alg, jkt, key = _proof_header(proof[: proof.index(".")])
    if alg not in algorithms:
        raise InvalidDPoPProof("the DPoP proof's alg is not an allowed asymmetric algorithm", dpop=True)
    # Cheap before expensive: a proof by the wrong key is refused before its signature is checked.
    if expected_jkt is not None and jkt != expected_jkt:
        raise InvalidDPoPProof(
            "the DPoP proof is signed by another key than the token is bound to", dpop=True
        )
    try:
        claims = jwt.decode(proof, key, algorithms=[alg], options=_PROOF_OPTIONS)
    except jwt.PyJWTError as exc:
        raise InvalidDPoPProof("the DPoP proof's signature or claims are invalid", dpop=True) from exc
    jti, proof_htm, proof_htu, iat = claims["jti"], claims["htm"], claims["htu"], claims["iat"]
    if not isinstance(jti, str) or not 8 <= len(jti) <= 256:
        raise InvalidDPoPProof("the DPoP proof's jti must be a string of 8 to 256 characters", dpop=True)
    if proof_htm != htm:
        raise InvalidDPoPProof("the DPoP proof is for another HTTP method", dpop=True)
    if not isinstance(proof_htu, str) or normalize_htu(proof_htu) != normalize_htu(htu):
        raise InvalidDPoPProof("the DPoP proof is for another URL", dpop=True)
    if nonce is not None and claims.get("nonce") != nonce:
        raise InvalidDPoPProof("the DPoP proof does not carry the expected nonce", dpop=True)
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise InvalidDPoPProof("the DPoP proof's iat must be an integer", dpop=True)
    current = time.time() if now is None else now
    if abs(current - iat) > max_age:
        raise InvalidDPoPProof("the DPoP proof is stale or from the future (iat)", dpop=True)
    if access_token is not None:
        ath = claims.get("ath")
        if not isinstance(ath, str) or not secrets.compare_digest(ath, access_token_hash(access_token)):
            raise InvalidDPoPProof("the DPoP proof's ath does not match the access token", dpop=True)
    if replay_cache is not None and not replay_cache.add(f"{jkt}:{jti}"):
        raise InvalidDPoPProof("the DPoP proof was already used (jti replayed)", dpop=True)
    return DPoPProof(jkt=jkt, jti=jti, htm=proof_htm, htu=proof_htu, iat=iat, claims=claims)

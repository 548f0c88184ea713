"""Resource-server verification of Countersign tokens.

- JWT access tokens, RFC 9068 (``typ: at+jwt``), and one-shot action tokens
  (``typ: action+jwt``) carrying RFC 9396 ``authorization_details``;
- JWT hygiene per RFC 8725: algorithm allow-list (§3.1), explicit ``typ`` per
  kind (§3.11), exact ``iss`` (§3.8), ``aud`` (§3.9), required ``exp``/``iat``/
  ``jti``/``sub``, small explicit leeway; ``kid`` is only a dictionary key and
  ``jku``/``x5u`` are never fetched (§3.10);
- keys from the issuer's JWKS (RFC 7517) found through RFC 8414 metadata;
- dual authentication: the user in ``sub`` and the current actor in the
  outermost ``act`` (RFC 8693 §4.1), which must be an active agent in the
  server's registry;
- sender constraint: for tokens with ``cnf.jkt``, the RFC 9449 §4.3 proof
  checks, and the proof key must be one the agent registered;
- action tokens: the action hash (base64url SHA-256 of the RFC 8785 canonical
  ``authorization_details``) recomputed from the request about to run, then
  exactly-once redemption at the server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jwt
import rfc8785

from .dpop import DPOP_ALGS, JtiStore, ReplayCache, verify_proof
from .errors import (
    ActionMismatch,
    AgentNotAllowed,
    AlreadyRedeemed,
    CountersignError,
    ExpiredToken,
    InstanceCutOff,
    InsufficientScope,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    ServiceUnavailable,
)
from .jsonbounds import jws_within
from .resource_metadata import metadata_document, metadata_url
from .usage import UsageReporter

__all__ = [
    "ACTION_TOKEN_TYP",
    "ALGORITHMS",
    "SESSION_TOKEN_TYP",
    "AgentRecord",
    "InstanceRecord",
    "TokenVerifier",
    "VerifiedToken",
    "action_hash",
    "basic_auth",
    "parse_authorization",
    "refusal",
]

SESSION_TOKEN_TYP = "at+jwt"
ACTION_TOKEN_TYP = "action+jwt"
ALGORITHMS: tuple[str, ...] = ("ES256", "RS256")
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti"]
MAX_LEEWAY = 30
MAX_ACTOR_DEPTH = 16
_DEFAULT_KEY_ALG = {("EC", "P-256"): "ES256", ("RSA", None): "RS256"}


def action_hash(details: Sequence[Mapping[str, Any]]) -> str:
    """base64url SHA-256 of the RFC 8785 (JCS) canonical JSON of ``authorization_details``
    (RFC 9396 §2): what an action token's ``action_hash`` claim holds."""
    digest = hashlib.sha256(rfc8785.dumps(list(details))).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def basic_auth(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1 HTTP Basic credentials: each part form-urlencoded before base64."""
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def parse_authorization(header: str | None) -> tuple[str, str]:
    """``(scheme, token)`` from an ``Authorization`` header: ``Bearer`` (RFC 6750 §2.1) or
    ``DPoP`` (RFC 9449 §7.1), scheme case-insensitive, returned as ``"Bearer"``/``"DPoP"``."""
    if not header:
        raise MissingToken("no access token")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    normalized = {"bearer": "Bearer", "dpop": "DPoP"}.get(scheme.lower())
    if normalized is None:
        raise MissingToken(f"unsupported authorization scheme {scheme[:20]!r}")
    if not token or " " in token or "," in token:
        raise InvalidRequest("malformed Authorization header", dpop=normalized == "DPoP")
    return normalized, token


@dataclass(frozen=True)
class AgentRecord:
    """One entry of the server's agent registry (``GET {agent_registry_endpoint}{client_id}``)."""

    client_id: str
    actor: str
    name: str
    publisher: str
    status: str
    jkt: frozenset[str]
    #: The agent may only hold DPoP-bound tokens: a bearer token naming it is refused.
    require_dpop: bool = False

    @property
    def active(self) -> bool:
        # "pending_review": a self-described agent an admin has not activated yet; the server gives it
        # session scopes only (never an action token), so its session tokens are good.
        return self.status in ("active", "pending_review")


@dataclass(frozen=True)
class InstanceRecord:
    """One instance of an agent on one grant, as the registry tells it
    (``GET {agent_registry_endpoint}{client_id}?instance=<id>&grant_id=<grant>``)."""

    instance: str
    grant_id: str
    status: str  # "active", "cut_off" or "unknown"
    jkt: str  # RFC 7638 thumbprint of the instance key its attestation vouched for


@dataclass(frozen=True)
class VerifiedToken:
    """A token that passed every check: who the user is, which agent acts, with what."""

    #: The user (``sub``), e.g. ``user:42``.
    subject: str
    #: The current actor, the outermost ``act.sub`` (RFC 8693 §4.1), e.g. ``agent:abc``.
    actor: str
    #: Every actor, current first; nested ones are history only (RFC 8693 §4.1).
    actor_chain: list[str]
    client_id: str | None
    scopes: frozenset[str]
    grant_id: str | None
    claims: dict[str, Any] = field(repr=False)
    #: RFC 7638 thumbprint of the key the token is bound to (RFC 9449 §6.1), or None.
    dpop_jkt: str | None = None
    #: Which instance of the agent acts (``act.instance``), or None for an agent that runs as one.
    instance: str | None = None

    @property
    def authorization_details(self) -> list[dict[str, Any]] | None:
        """The approved RFC 9396 ``authorization_details`` (action tokens only)."""
        details = self.claims.get("authorization_details")
        return details if isinstance(details, list) else None

    @property
    def is_action(self) -> bool:
        return "action_hash" in self.claims


class TokenVerifier:
    """Verifies Countersign session and action tokens for one resource server (``audience``).

    Thread-safe; keep one per process. Network calls (metadata, JWKS, agent
    registry, redemption) go through ``http`` and only happen on a cache miss:
    the JWKS is refetched only for an unknown ``kid`` and at most once per
    ``jwks_min_refetch_interval`` seconds (and after ``jwks_max_age``), the
    registry is consulted once per agent per ``registry_ttl`` seconds.

    ``client_id``/``client_secret`` are this resource server's credentials (HTTP Basic
    at the agent registry and the redemption endpoint). ``leeway`` (≤ 30 s) applies to
    ``exp``/``iat``/``nbf``; ``dpop_max_age`` bounds a proof's ``iat`` either way.
    ``replay_cache`` keeps seen DPoP proof ``jti`` values: in-process by default; give
    a shared :class:`~countersign.dpop.JtiStore` when several processes serve one API.
    ``scopes_supported``, ``resource_name`` and ``resource_metadata_url`` (by default
    the RFC 9728 §3.1 URL of ``audience``) describe the resource (RFC 9728 §2).
    """

    def __init__(
        self,
        issuer: str,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        audience: str,
        http: httpx.Client | None = None,
        leeway: int = 10,
        jwks_min_refetch_interval: float = 30.0,
        jwks_max_age: float = 300.0,
        registry_ttl: float = 30.0,
        max_token_bytes: int = 8192,
        algorithms: Sequence[str] = ALGORITHMS,
        dpop_max_age: float = 60.0,
        dpop_algorithms: Sequence[str] = DPOP_ALGS,
        replay_cache: JtiStore | None = None,
        scopes_supported: Sequence[str] = (),
        resource_name: str | None = None,
        resource_metadata_url: str | None = None,
        report_usage: bool = False,
        usage_queue: int = 10_000,
        usage_interval: float = 2.0,
    ) -> None:
        if not 0 <= leeway <= MAX_LEEWAY:
            raise ValueError(
                f"leeway must be between 0 and {MAX_LEEWAY} seconds (RFC 8725 §3.10: small, explicit)"
            )
        unknown = set(algorithms) - set(ALGORITHMS)
        if unknown or not algorithms:
            raise ValueError(f"algorithms must be a non-empty subset of {ALGORITHMS}")
        if (client_id is None) != (client_secret is None):
            raise ValueError(
                "give both client_id and client_secret (the resource server's credentials), or neither"
            )
        if not audience:
            raise ValueError("audience (this resource server's audience URI) is required")
        self.issuer = issuer
        self.audience = audience
        self.client_id = client_id
        self.leeway = leeway
        self.jwks_min_refetch_interval = jwks_min_refetch_interval
        self.jwks_max_age = jwks_max_age
        self.registry_ttl = registry_ttl
        self.max_token_bytes = max_token_bytes
        self.algorithms = tuple(algorithms)
        self.dpop_max_age = dpop_max_age
        self.dpop_algorithms = tuple(dpop_algorithms)
        self._auth = basic_auth(client_id, client_secret) if client_id and client_secret else None
        self._http = http or httpx.Client(timeout=10.0, follow_redirects=False)
        self._metadata: dict[str, Any] | None = None
        self._keys: dict[str, tuple[Any, str]] = {}  # kid -> (public key object, alg)
        self._jwks_fetched_at: float | None = None  # monotonic
        self._jwks_lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._agents: dict[str, tuple[float, AgentRecord | None]] = {}
        self._instances: dict[tuple[str, str, str], tuple[float, InstanceRecord]] = {}
        self._agent_locks: dict[str, threading.Lock] = {}
        self._agent_locks_lock = threading.Lock()
        # A proof is accepted only within dpop_max_age of its iat, so remembering its jti
        # for twice that (from acceptance) outlives every moment it could be replayed.
        self.replay_cache: JtiStore = replay_cache or ReplayCache(2 * dpop_max_age + leeway + 1)
        self._decode_options: Any = {"require": REQUIRED_CLAIMS}
        self._headers: dict[str, dict[str, Any]] = {}  # JOSE header segment -> parsed header
        self.fetch_count = 0  # JWKS fetches, for tests and metrics
        # RFC 9728: what the resource publishes about itself, and where (an http(s) audience only).
        self.scopes_supported = tuple(scopes_supported)
        self.resource_name = resource_name
        if resource_metadata_url is None and audience.startswith(("https://", "http://")):
            resource_metadata_url = metadata_url(audience)
        self.resource_metadata_url = resource_metadata_url

        # Each accepted session-token use, reported back off the request path (countersign.usage).
        self.usage: UsageReporter | None = None
        if report_usage:
            if self._auth is None:
                raise ValueError("report_usage needs the resource server's client_id and client_secret")
            self.usage = UsageReporter(
                lambda: self._endpoint("usage_endpoint"),
                authorization=self._auth,
                max_queue=usage_queue,
                interval=usage_interval,
            )

    def close(self) -> None:
        """Send the usage reports still queued, stop their thread, close the HTTP client."""
        if self.usage is not None:
            self.usage.close()
        self._http.close()

    def protected_resource_metadata(self) -> dict[str, Any]:
        """This resource server's RFC 9728 §2 metadata document."""
        return metadata_document(
            resource=self.audience,
            issuer=self.issuer,
            scopes_supported=self.scopes_supported,
            resource_name=self.resource_name,
            dpop_algorithms=self.dpop_algorithms,
        )

    def refusal(self, exc: CountersignError) -> tuple[int, dict[str, str], dict[str, str]]:
        """:func:`refusal`, naming this server's metadata URL in the challenge (RFC 9728 §5.1)."""
        return refusal(exc, resource_metadata=self.resource_metadata_url)

    # --- discovery (RFC 8414) -----------------------------------------------------------------

    def _get_json(self, url: str, *, auth: bool = False) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if auth and self._auth:
            headers["Authorization"] = self._auth
        try:
            response = self._http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"cannot reach the authorization server ({type(exc).__name__})") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        return response.status_code, body

    def metadata(self) -> dict[str, Any]:
        """The issuer's RFC 8414 metadata, fetched once; its ``issuer`` must be ours (§3.3)."""
        meta = self._metadata
        if meta is not None:
            return meta
        with self._meta_lock:
            if self._metadata is not None:
                return self._metadata
            url = f"{self.issuer.rstrip('/')}/.well-known/oauth-authorization-server"
            status, body = self._get_json(url)
            if status != 200 or not isinstance(body, dict):
                raise ServiceUnavailable(f"authorization server metadata unavailable (HTTP {status})")
            if body.get("issuer") != self.issuer:
                raise ServiceUnavailable("the metadata's issuer is not the configured issuer (RFC 8414 §3.3)")
            if not isinstance(body.get("jwks_uri"), str):
                raise ServiceUnavailable("the authorization server metadata has no jwks_uri")
            self._metadata = body
            return body

    def _post_form(self, endpoint: str, data: Mapping[str, str], *, what: str) -> tuple[int, dict[str, Any]]:
        """POST a form to the advertised ``endpoint`` with this resource server's credentials (RFC 6749
        §2.3.1 HTTP Basic); the status and the JSON object answered ({} for anything else)."""
        headers = {"Accept": "application/json", **({"Authorization": self._auth} if self._auth else {})}
        try:
            response = self._http.post(self._endpoint(endpoint), data=dict(data), headers=headers)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"cannot reach {what} ({type(exc).__name__})") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        return response.status_code, body if isinstance(body, dict) else {}

    def _endpoint(self, name: str) -> str:
        url = self.metadata().get(name)
        if not isinstance(url, str) or not url:
            raise ServiceUnavailable(f"the authorization server advertises no {name}")
        return url

    # --- keys (RFC 7517) ----------------------------------------------------------------------

    def _fetch_jwks(self) -> None:
        """Replace the key map with the current JWKS. Caller holds ``_jwks_lock``."""
        self._jwks_fetched_at = time.monotonic()
        self.fetch_count += 1
        status, body = self._get_json(self._endpoint("jwks_uri"))
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise ServiceUnavailable(f"JWKS unavailable (HTTP {status})")
        keys: dict[str, tuple[Any, str]] = {}
        for jwk in body["keys"]:
            if (
                not isinstance(jwk, dict)
                or not isinstance(jwk.get("kid"), str)
                or jwk.get("use", "sig") != "sig"
            ):
                continue
            alg = jwk.get("alg") or _DEFAULT_KEY_ALG.get((str(jwk.get("kty")), jwk.get("crv")))
            if alg not in self.algorithms:
                continue
            try:
                keys[jwk["kid"]] = (jwt.PyJWK(jwk, algorithm=alg).key, alg)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue  # one unusable key must not take the others down
        self._keys = keys

    def _key(self, kid: Any) -> tuple[Any, str]:
        """The published key for ``kid``: a dictionary lookup, refetching only within limits."""
        now = time.monotonic()
        fetched = self._jwks_fetched_at
        if fetched is not None and now - fetched < self.jwks_max_age:
            entry = self._keys.get(kid) if isinstance(kid, str) else None
            if entry is not None:
                return entry
        if not isinstance(kid, str) or not kid or len(kid) > 128:
            raise InvalidToken("the token names no usable signing key (kid)")
        with self._jwks_lock:
            fetched = self._jwks_fetched_at
            stale = fetched is None or now - fetched >= self.jwks_max_age
            if kid not in self._keys or stale:
                may_fetch = fetched is None or time.monotonic() - fetched >= self.jwks_min_refetch_interval
                if may_fetch:
                    try:
                        self._fetch_jwks()
                    except ServiceUnavailable:
                        if not self._keys:
                            raise
                        # Keep verifying with the keys we have; retry after the interval.
            entry = self._keys.get(kid)
        if entry is None:
            raise InvalidToken("the token is signed with an unknown key")
        return entry

    # --- agent registry -----------------------------------------------------------------------

    def agent(self, client_id: str) -> AgentRecord | None:
        """The registry's entry for an agent (None if unknown), cached ``registry_ttl`` seconds."""
        cached = self._agents.get(client_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        with self._agent_locks_lock:
            lock = self._agent_locks.setdefault(client_id, threading.Lock())
        with lock:
            cached = self._agents.get(client_id)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            record = self._fetch_agent(client_id)
            self._agents[client_id] = (time.monotonic() + self.registry_ttl, record)
            if len(self._agents) > 10_000:
                self._agents = {k: v for k, v in self._agents.items() if v[0] > time.monotonic()}
            return record

    def _fetch_agent(self, client_id: str) -> AgentRecord | None:
        url = self._endpoint("agent_registry_endpoint") + quote(client_id, safe="")
        status, body = self._get_json(url, auth=True)
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise ServiceUnavailable(f"the agent registry did not answer (HTTP {status})")
        if body.get("client_id") != client_id:
            raise ServiceUnavailable("the agent registry answered for another agent")
        jkt = body.get("jkt") or []
        return AgentRecord(
            client_id=client_id,
            actor=str(body.get("actor") or f"agent:{client_id}"),
            name=str(body.get("name") or ""),
            publisher=str(body.get("publisher") or ""),
            status=str(body.get("status") or ""),
            jkt=frozenset(j for j in jkt if isinstance(j, str)) if isinstance(jkt, list) else frozenset(),
            require_dpop=body.get("require_dpop") is True,
        )

    def forget_agent(self, client_id: str) -> None:
        """Drop the cached registry entry (e.g. on a suspension webhook)."""
        self._agents.pop(client_id, None)
        self._instances = {k: v for k, v in self._instances.items() if k[0] != client_id}

    def agent_instance(self, client_id: str, *, grant_id: str, instance: str) -> InstanceRecord:
        """The registry's word on one instance of an agent on one grant, cached ``registry_ttl`` seconds."""
        key = (client_id, grant_id, instance)
        cached = self._instances.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        url = (
            self._endpoint("agent_registry_endpoint")
            + quote(client_id, safe="")
            + f"?instance={quote(instance, safe='')}&grant_id={quote(grant_id, safe='')}"
        )
        status, body = self._get_json(url, auth=True)
        entry = body.get("instance") if status == 200 and isinstance(body, dict) else None
        if status == 404:
            entry = {"status": "unknown"}
        if not isinstance(entry, dict):
            raise ServiceUnavailable(f"the agent registry did not answer for the instance (HTTP {status})")
        record = InstanceRecord(
            instance=instance,
            grant_id=grant_id,
            status=str(entry.get("status") or "unknown"),
            jkt=str(entry.get("jkt") or ""),
        )
        if len(self._instances) > 10_000:
            self._instances = {k: v for k, v in self._instances.items() if v[0] > time.monotonic()}
        self._instances[key] = (time.monotonic() + self.registry_ttl, record)
        return record

    # --- verification -------------------------------------------------------------------------

    def verify_session(
        self,
        token: str,
        *,
        required_scopes: Iterable[str] = (),
        dpop_proof: str | None = None,
        htm: str | None = None,
        htu: str | None = None,
        scheme: str | None = None,
        operation: str = "",
    ) -> VerifiedToken:
        """Verify a session access token (RFC 9068, ``typ: at+jwt``) for this resource server.

        ``required_scopes`` must all be in the token's ``scope`` (else
        :class:`InsufficientScope`). For a DPoP-bound token pass the request's
        ``DPoP`` header value and its method and URL (RFC 9449 §7.1); pass the
        Authorization ``scheme`` when known so a bound token sent as ``Bearer``
        is refused (§7.2).

        With ``report_usage``, the accepted use is queued for Countersign (``operation`` is a
        short label, e.g. "search catalog"; by default the method and path), never sent here.
        """
        verified = self._verify(
            token, typ=SESSION_TOKEN_TYP, dpop_proof=dpop_proof, htm=htm, htu=htu, scheme=scheme
        )
        required = list(required_scopes)
        self._check_scopes(verified, required)
        if self.usage is not None:
            label = operation or (f"{htm} {urlsplit(htu).path}" if htm and htu else "")
            for scope in required or sorted(verified.scopes)[:1]:
                self.usage.report(jti=str(verified.claims.get("jti", "")), scope=scope, operation=label)
        return verified

    def verify_action(
        self,
        token: str,
        *,
        expected_details: Sequence[Mapping[str, Any]],
        redeem: bool = True,
        required_scopes: Iterable[str] = (),
        dpop_proof: str | None = None,
        htm: str | None = None,
        htu: str | None = None,
        scheme: str | None = None,
    ) -> VerifiedToken:
        """Verify a one-shot action token (``typ: action+jwt``) for the action about to run.

        ``expected_details`` is the RFC 9396 ``authorization_details`` array the
        caller derives from the request it is about to execute; its action hash
        must equal the token's ``action_hash``, which must in turn equal the hash
        of the token's own ``authorization_details`` (else :class:`ActionMismatch`).
        With ``redeem`` the token is then redeemed at the server, exactly once
        (:class:`AlreadyRedeemed` for a second use). Redeem before acting.
        """
        if not isinstance(expected_details, Sequence) or isinstance(expected_details, (str, bytes)):
            raise TypeError("expected_details must be a list of authorization_details objects")
        verified = self._verify(
            token, typ=ACTION_TOKEN_TYP, dpop_proof=dpop_proof, htm=htm, htu=htu, scheme=scheme
        )
        self._check_scopes(verified, required_scopes)
        claims = verified.claims
        claimed = claims.get("action_hash")
        if not isinstance(claimed, str) or not isinstance(claims.get("authorization_details"), list):
            raise InvalidToken(
                "the action token lacks action_hash or authorization_details",
                dpop=verified.dpop_jkt is not None,
            )
        try:
            expected = action_hash(expected_details)
            embedded = action_hash(claims["authorization_details"])
        except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
            raise ActionMismatch("the action cannot be canonicalised (RFC 8785)") from exc
        if embedded != claimed:
            raise ActionMismatch("the token's action_hash does not match its authorization_details")
        if expected != claimed:
            raise ActionMismatch("this request is not the approved action (action_hash differs)")
        if redeem:
            self.redeem(token, action_hash=expected)
        return verified

    def redeem(self, token: str, *, action_hash: str = "") -> dict[str, Any]:
        """POST the action token to the server's ``redemption_endpoint`` (resource-server
        HTTP Basic authentication, RFC 6749 §2.3.1). Exactly one redemption ever succeeds."""
        data = {"token": token}
        if action_hash:
            data["action_hash"] = action_hash
        status, body = self._post_form("redemption_endpoint", data, what="the redemption endpoint")
        if status == 200 and body.get("redeemed") is True:
            return body
        error = str(body.get("error") or "")
        description = str(body.get("error_description") or "")
        reason = str(body.get("reason") or error)  # the server's stable name of the refusal
        if status >= 500 or error == "invalid_client":
            raise ServiceUnavailable(f"redemption failed: {error or status} {description}".strip())
        if reason == "already_redeemed":
            raise AlreadyRedeemed(description)
        if reason == "action_mismatch":
            raise ActionMismatch(description)
        raise InvalidToken(description or error or "the action token was refused at redemption")

    @staticmethod
    def _check_scopes(verified: VerifiedToken, required: Iterable[str]) -> None:
        required = tuple(required)
        if required and not verified.scopes.issuperset(required):
            raise InsufficientScope(
                "the token lacks a required scope", scope=required, dpop=verified.dpop_jkt is not None
            )

    def _header(self, token: Any) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise MissingToken("no access token")
        if len(token) > self.max_token_bytes:
            raise InvalidToken("token too large")
        if not token.isascii() or token.count(".") != 2 or not jws_within(token):
            raise InvalidToken("malformed token")  # too deep: json would recurse past its limit
        segment = token[: token.index(".")]
        # Every token one key signs has the same header: parse each distinct one once.
        header = self._headers.get(segment)
        if header is not None:
            return header
        try:
            header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        except (ValueError, binascii.Error) as exc:
            raise InvalidToken("malformed token") from exc
        if not isinstance(header, dict):
            raise InvalidToken("malformed token")
        kid = header.get("kid")
        if len(self._headers) < 64 and isinstance(kid, str) and kid in self._keys:  # bounded; our keys only
            self._headers[segment] = header
        return header

    def _verify(
        self,
        token: str,
        *,
        typ: str,
        dpop_proof: str | None,
        htm: str | None,
        htu: str | None,
        scheme: str | None,
    ) -> VerifiedToken:
        header = self._header(token)
        token_typ = header.get("typ")
        if not isinstance(token_typ, str) or token_typ.lower().removeprefix("application/") != typ:
            raise InvalidToken(f"wrong token type (expected {typ})")
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise InvalidToken("algorithm not allowed")
        if "crit" in header:
            raise InvalidToken("unsupported critical header parameters")
        key, key_alg = self._key(header.get("kid"))
        if alg != key_alg:
            raise InvalidToken("algorithm does not match the signing key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[key_alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self._decode_options,
            )
        except jwt.ExpiredSignatureError as exc:
            raise ExpiredToken("token expired") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks the {exc.claim} claim") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("token is not for this resource server (aud)") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken("token is from another issuer") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("token not yet valid") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("token signature invalid") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("invalid token") from exc
        if claims["iss"] != self.issuer:  # exact, whatever the pyjwt version does
            raise InvalidToken("token is from another issuer")
        sub = claims["sub"]
        if not isinstance(sub, str) or not isinstance(claims["jti"], str):
            raise InvalidToken("sub and jti must be strings")
        cnf = claims.get("cnf")
        jkt: str | None = None
        if cnf is not None:
            jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
            if not isinstance(jkt, str):
                raise InvalidToken("unsupported confirmation method (cnf)")
        bound = jkt is not None
        chain = self._actor_chain(claims, bound)
        actor = chain[0]
        agent_id = actor.removeprefix("agent:")
        if not actor.startswith("agent:") or not agent_id:
            raise InvalidToken("the acting party is not an agent", dpop=bound)
        client_id = claims.get("client_id")
        if client_id is not None and client_id != agent_id:
            raise InvalidToken("client_id and the current actor (act.sub) differ", dpop=bound)
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise InvalidToken("scope must be a space-separated string", dpop=bound)
        if bound:
            if scheme is not None and scheme.lower() != "dpop":
                raise InvalidToken(
                    "a DPoP-bound token must be presented with the DPoP scheme (RFC 9449 §7.2)",
                    dpop=True,
                    dpop_algs=self.dpop_algorithms,
                )
            if dpop_proof is None:
                raise InvalidDPoPProof(
                    "this token is DPoP-bound: a DPoP proof is required",
                    dpop=True,
                    dpop_algs=self.dpop_algorithms,
                )
            if htm is None or htu is None:
                raise TypeError("verifying a DPoP-bound token needs the request's method (htm) and URL (htu)")
            try:
                verify_proof(
                    dpop_proof,
                    htm=htm,
                    htu=htu,
                    access_token=token,
                    expected_jkt=jkt,
                    max_age=self.dpop_max_age,
                    algorithms=self.dpop_algorithms,
                    replay_cache=self.replay_cache,
                )
            except InvalidDPoPProof as exc:
                raise InvalidDPoPProof(exc.description, dpop=True, dpop_algs=self.dpop_algorithms) from None
        elif scheme is not None and scheme.lower() == "dpop":
            raise InvalidToken(
                "the token is not DPoP-bound: present it with the Bearer scheme",
                dpop=True,
                dpop_algs=self.dpop_algorithms,
            )
        record = self.agent(agent_id)
        if record is None:
            raise AgentNotAllowed(f"{actor} is not a registered agent", dpop=bound)
        if not record.active or record.actor != actor:
            raise AgentNotAllowed(f"{actor} is {record.status or 'not active'}", dpop=bound)
        if not bound and record.require_dpop:
            raise InvalidToken(
                f"{actor} may only use DPoP-bound tokens", dpop=True, dpop_algs=self.dpop_algorithms
            )
        grant_id = claims.get("grant_id")
        act = claims["act"]
        instance = act.get("instance")
        if instance is not None:  # one instance of the agent: live in the registry, bound to its own key
            if not isinstance(instance, str) or not instance or not isinstance(grant_id, str):
                raise InvalidToken("malformed act.instance", dpop=bound)
            seen = self.agent_instance(agent_id, grant_id=grant_id, instance=instance)
            if seen.status != "active":
                raise InstanceCutOff(
                    f"instance {instance} of {actor} is {seen.status.replace('_', ' ')}", dpop=bound
                )
            if bound and jkt != seen.jkt:
                raise InvalidDPoPProof(
                    f"the DPoP key is not the key attested for instance {instance} of {actor}",
                    dpop=True,
                    dpop_algs=self.dpop_algorithms,
                )
        elif bound and jkt not in record.jkt:
            raise InvalidDPoPProof(
                f"the DPoP key is not registered for {actor}", dpop=True, dpop_algs=self.dpop_algorithms
            )
        return VerifiedToken(
            subject=sub,
            actor=actor,
            actor_chain=chain,
            client_id=client_id if isinstance(client_id, str) else None,
            scopes=frozenset(scope.split()),
            grant_id=grant_id if isinstance(grant_id, str) else None,
            claims=claims,
            dpop_jkt=jkt,
            instance=instance,
        )

    @staticmethod
    def _actor_chain(claims: Mapping[str, Any], bound: bool) -> list[str]:
        """RFC 8693 §4.1: outermost ``act`` is the current actor; nested ones are history."""
        chain: list[str] = []
        act = claims.get("act")
        while act is not None:
            if (
                not isinstance(act, dict)
                or not isinstance(act.get("sub"), str)
                or len(chain) >= MAX_ACTOR_DEPTH
            ):
                raise InvalidToken("malformed act claim", dpop=bound)
            chain.append(act["sub"])
            act = act.get("act")
        if not chain:
            raise InvalidToken("the token names no acting agent (act)", dpop=bound)
        return chain


def refusal(
    exc: CountersignError, *, resource_metadata: str | None = None
) -> tuple[int, dict[str, str], dict[str, str]]:
    """``(status, headers, body)`` for a refusal: the one place integrations render errors.
    ``resource_metadata``: the RFC 9728 metadata URL every challenge names (§5.1)."""
    headers = {"Cache-Control": "no-store"}
    if exc.status_code in (400, 401, 403):
        headers["WWW-Authenticate"] = exc.www_authenticate(resource_metadata)
    return exc.status_code, headers, exc.as_dict()

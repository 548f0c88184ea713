"""The agent's side of Countersign: session grant, token upkeep, step-up approvals.

- Session grant: authorization code with PKCE S256 (RFC 6749 §4.1, RFC 7636 §4.2).
- Token upkeep: the session token is re-minted before it expires, with the
  refresh token (RFC 6749 §6) in ``rotating`` mode, or by RFC 8693 token
  exchange (§2.1) authenticated with ``private_key_jwt`` (RFC 7523 §2.2) in
  ``exchange`` mode; otherwise :class:`~countersign.errors.SessionEnded`.
- Step-up: OpenID CIBA Core 1.0 backchannel authentication (§7) with RFC 9396
  ``authorization_details``, then polling (§10.1) honouring ``interval`` and
  ``slow_down`` (§11), or woken by a ping (§10.2) via :meth:`AgentClient.on_ping`.
- Optional instances (draft-ietf-oauth-attestation-based-client-auth): with ``instance``
  (:class:`~countersign.instance.AgentInstance`) the client authenticates as that one instance
  of the agent, with the attestation the agent's key signed and a fresh PoP per request.
- Optional DPoP (RFC 9449): a proof with every token request, the server's
  nonce honoured (§8), and proofs with ``ath`` for resource requests (§7.1).

The protocol logic is written once, as generators that yield the HTTP requests
and waits they need; :class:`AgentClient` runs them with ``httpx.Client`` and
threads, :class:`AsyncAgentClient` with ``httpx.AsyncClient`` and asyncio.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlencode

import httpx
import jwt

from .dpop import DPoPKey, PrivateKey, default_alg
from .errors import (
    AgentError,
    ApprovalDenied,
    ApprovalError,
    ApprovalExpired,
    ApprovalTimeout,
    GrantRevoked,
    OAuthError,
    SessionEnded,
)
from .instance import AgentInstance
from .verifier import action_hash, basic_auth

__all__ = ["ActionToken", "AgentClient", "AsyncAgentClient", "TokenSet"]

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TYPE_CIBA = "urn:openid:params:grant-type:ciba"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_INTERVAL = 5  # CIBA Core §7.3: when the server names none
SLOW_DOWN_STEP = 5  # CIBA Core §11 / RFC 8628 §3.5

T = TypeVar("T")


@dataclass(frozen=True)
class TokenSet:
    """A session token response (RFC 6749 §5.1) as the client keeps it."""

    access_token: str
    token_type: str
    expires_at: float  # wall clock (time.time())
    refresh_token: str | None
    scope: frozenset[str]
    raw: dict[str, Any] = field(repr=False)

    @property
    def expires_in(self) -> float:
        return self.expires_at - time.time()

    @property
    def dpop_bound(self) -> bool:
        return self.token_type.lower() == "dpop"


@dataclass(frozen=True)
class ActionToken:
    """A one-shot action token for exactly the approved ``authorization_details``."""

    token: str
    expires_in: int
    authorization_details: list[dict[str, Any]]
    scope: str = ""
    token_type: str = "Bearer"
    auth_req_id: str = ""

    @property
    def dpop_bound(self) -> bool:
        return self.token_type.lower() == "dpop"


class _Http(NamedTuple):
    method: str
    url: str
    data: dict[str, str] | None
    headers: dict[str, str]


class _Wait(NamedTuple):
    seconds: float
    auth_req_id: str


Flow = Generator[_Http | _Wait, Any, T]


class _LoginHintExpired(Exception):
    """CIBA Core §13 ``expired_login_hint_token``: re-mint the session token and ask again."""


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(status: int, body: Mapping[str, Any], cls: type[AgentError] = OAuthError) -> AgentError:
    return cls(
        str(body.get("error") or f"http_{status}"),
        str(body.get("error_description") or ""),
        status_code=status,
    )


class _AgentCore:
    """Protocol state and logic shared by the sync and async clients (no I/O here)."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        *,
        client_secret: str | None = None,
        private_key: PrivateKey | None = None,
        key_id: str | None = None,
        redirect_uri: str | None = None,
        dpop_key: DPoPKey | PrivateKey | None = None,
        refresh_margin: float = 30.0,
        ping_mode: bool = False,
        instance: AgentInstance | None = None,
    ) -> None:
        self.issuer = issuer
        self.instance = instance
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.refresh_margin = refresh_margin
        self.ping_mode = ping_mode
        self._client_secret = client_secret
        self._private_key = private_key
        self._key_id = key_id
        self._assertion_alg = default_alg(private_key) if private_key is not None else ""
        if dpop_key is not None and not isinstance(dpop_key, DPoPKey):
            dpop_key = DPoPKey(dpop_key)
        self.dpop_key: DPoPKey | None = dpop_key
        self.dpop_nonce: str | None = None  # the authorization server's latest DPoP-Nonce (§8)
        self.tokens: TokenSet | None = None
        self._metadata: dict[str, Any] | None = None
        self._events: dict[str, Any] = {}
        self._pinged: set[str] = set()
        self._notification_tokens: dict[str, str] = {}
        self._events_lock = threading.Lock()

    # --- discovery (RFC 8414) ----------------------------------------------------------------

    def _metadata_flow(self) -> Flow[dict[str, Any]]:
        if self._metadata is None:
            url = f"{self.issuer.rstrip('/')}/.well-known/oauth-authorization-server"
            response = yield _Http("GET", url, None, {"Accept": "application/json"})
            body = _json(response)
            if response.status_code != 200 or body.get("issuer") != self.issuer:
                raise OAuthError(
                    "invalid_metadata",
                    "authorization server metadata missing or for another issuer (RFC 8414 §3.3)",
                    status_code=response.status_code,
                )
            self._metadata = body
        return self._metadata

    def _endpoint(self, name: str) -> Flow[str]:
        metadata = yield from self._metadata_flow()
        url = metadata.get(name)
        if not isinstance(url, str) or not url:
            raise OAuthError("invalid_metadata", f"the authorization server advertises no {name}")
        return url

    # --- client authentication (RFC 6749 §2.3.1, RFC 7523 §2.2) -------------------------------

    def client_assertion(self, audience: str) -> str:
        """A ``private_key_jwt`` assertion (RFC 7523 §3): iss = sub = client id, ``aud`` the
        endpoint, 60 s life, a fresh ``jti``, ``kid`` naming the registered key."""
        if self._private_key is None:
            raise SessionEnded("unauthorized_client", "no private key to sign a client assertion with")
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_urlsafe(24),
        }
        headers = {"kid": self._key_id} if self._key_id else None
        return jwt.encode(claims, self._private_key, algorithm=self._assertion_alg, headers=headers)

    def _authenticate(
        self, data: dict[str, str], headers: dict[str, str], *, audience: str, require_key: bool
    ) -> None:
        if self.instance is not None:  # the attestation is the client authentication, for every endpoint
            headers.update(self.instance.headers(self.issuer))
        elif self._private_key is not None:
            data.update(
                client_id=self.client_id,
                client_assertion_type=CLIENT_ASSERTION_TYPE,
                client_assertion=self.client_assertion(audience),
            )
        elif require_key:
            raise SessionEnded("unauthorized_client", "token exchange needs private_key_jwt: no private key")
        elif self._client_secret is not None:
            headers["Authorization"] = basic_auth(self.client_id, self._client_secret)
        else:
            data["client_id"] = self.client_id

    def _post_flow(
        self,
        endpoint: str,
        data: Mapping[str, str],
        *,
        dpop: bool = False,
        require_key: bool = False,
        audience: str | None = None,
    ) -> Flow[tuple[int, dict[str, Any]]]:
        """POST with client authentication and, for the token endpoint, a DPoP proof; one
        retry when the server answers ``use_dpop_nonce`` (RFC 9449 §8)."""
        url = yield from self._endpoint(endpoint)
        for attempt in range(2):
            payload, headers = dict(data), {"Accept": "application/json"}
            self._authenticate(payload, headers, audience=audience or url, require_key=require_key)
            if dpop and self.dpop_key is not None:
                headers["DPoP"] = self.dpop_key.proof("POST", url, nonce=self.dpop_nonce)
            response = yield _Http("POST", url, payload, headers)
            nonce = response.headers.get("DPoP-Nonce")
            if nonce:
                self.dpop_nonce = nonce
            body = _json(response)
            if (
                attempt == 0
                and dpop
                and self.dpop_key is not None
                and nonce
                and response.status_code in (400, 401)
                and body.get("error") == "use_dpop_nonce"
            ):
                continue
            return response.status_code, body
        raise AssertionError("unreachable")

    def _token_flow(self, data: Mapping[str, str], *, require_key: bool = False) -> Flow[dict[str, Any]]:
        status, body = yield from self._post_flow("token_endpoint", data, dpop=True, require_key=require_key)
        if status != 200 or not isinstance(body.get("access_token"), str):
            raise _error(status, body)
        return body

    # --- session grant (RFC 6749 §4.1, RFC 7636) -----------------------------------------------

    def _authorization_url_flow(
        self, scopes: Iterable[str] | str, state: str | None
    ) -> Flow[tuple[str, str, str]]:
        if not self.redirect_uri:
            raise ValueError("authorization_url needs the client's redirect_uri")
        endpoint = yield from self._endpoint("authorization_endpoint")
        verifier = secrets.token_urlsafe(64)  # RFC 7636 §4.1: 43-128 characters, 86 here
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = state or secrets.token_urlsafe(24)
        scope = scopes if isinstance(scopes, str) else " ".join(scopes)
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": scope,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        separator = "&" if "?" in endpoint else "?"
        return f"{endpoint}{separator}{query}", state, verifier

    def _exchange_code_flow(self, code: str, code_verifier: str) -> Flow[TokenSet]:
        if not self.redirect_uri:
            raise ValueError("exchange_code needs the client's redirect_uri")
        body = yield from self._token_flow(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": code_verifier,
            }
        )
        return self._store(body)

    def _store(self, body: Mapping[str, Any], previous: TokenSet | None = None) -> TokenSet:
        try:
            expires_in = float(body.get("expires_in") or 0)
        except (TypeError, ValueError):
            expires_in = 0.0
        refresh = body.get("refresh_token")
        scope = body.get("scope")
        tokens = TokenSet(
            access_token=str(body["access_token"]),
            token_type=str(body.get("token_type") or "Bearer"),
            expires_at=time.time() + expires_in,
            # RFC 6749 §6: without a new refresh token, the old one stays valid.
            refresh_token=refresh
            if isinstance(refresh, str)
            else (previous.refresh_token if previous else None),
            scope=frozenset(scope.split())
            if isinstance(scope, str)
            else (previous.scope if previous else frozenset()),
            raw=dict(body),
        )
        self.tokens = tokens
        return tokens

    # --- token upkeep -------------------------------------------------------------------------

    def _fresh(self) -> TokenSet | None:
        tokens = self.tokens
        if tokens is not None and tokens.expires_at - self.refresh_margin > time.time():
            return tokens
        return None

    def _remint_flow(self) -> Flow[TokenSet]:
        """A new session token: refresh grant (RFC 6749 §6) if we hold a refresh token, else
        RFC 8693 token exchange with ``private_key_jwt``; :class:`SessionEnded` when refused."""
        current = self.tokens
        if current is None:
            raise SessionEnded("no_session", "no session token yet: run the authorization code flow first")
        try:
            if current.refresh_token:
                body = yield from self._token_flow(
                    {"grant_type": "refresh_token", "refresh_token": current.refresh_token}
                )
            elif self._private_key is not None or self.instance is not None:
                body = yield from self._token_flow(
                    {
                        "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
                        "subject_token": current.access_token,
                        "subject_token_type": TOKEN_TYPE_ACCESS,
                    },
                    require_key=True,
                )
            else:
                raise SessionEnded(
                    "no_session", "no refresh token and no key for token exchange: consent again"
                )
        except OAuthError as exc:
            if exc.error in ("invalid_grant", "unauthorized_client", "invalid_client", "invalid_scope"):
                self.tokens = None
                raise SessionEnded(exc.error, exc.description, status_code=exc.status_code) from exc
            raise
        return self._store(body, previous=current)

    def _end_session_flow(self) -> Flow[bool]:
        """RFC 7009 §2.1: revoke the session's refresh (or access) token, which ends its grant at
        Countersign; §2.2: 200 whether or not the token was still known."""
        current = self.tokens
        if current is None:
            return False
        token, hint = (
            (current.refresh_token, "refresh_token")
            if current.refresh_token
            else (current.access_token, "access_token")
        )
        status, body = yield from self._post_flow(
            "revocation_endpoint", {"token": token, "token_type_hint": hint}
        )
        if status != 200:
            raise _error(status, body)
        self.tokens = None
        return True

    def auth_headers(
        self, method: str, url: str, *, token: TokenSet | ActionToken | None = None
    ) -> dict[str, str]:
        """``Authorization`` (and ``DPoP``) headers to call a resource server with ``token``
        (default: the cached session token, which must be fresh; see ``access_token``).

        A DPoP-bound token gets the ``DPoP`` scheme and a proof with ``ath`` (RFC 9449 §7.1).
        """
        if token is None:
            token = self.tokens
            if token is None:
                raise SessionEnded("no_session", "no session token")
        value = token.access_token if isinstance(token, TokenSet) else token.token
        if token.dpop_bound:
            if self.dpop_key is None:
                raise ValueError("a DPoP-bound token needs the client's dpop_key")
            return {
                "Authorization": f"DPoP {value}",
                "DPoP": self.dpop_key.proof(method, url, access_token=value),
            }
        return {"Authorization": f"Bearer {value}"}

    # --- step-up approvals (OpenID CIBA Core 1.0) -----------------------------------------------

    def _approval_flow(
        self,
        session_token: str,
        scope: str,
        details: Sequence[Mapping[str, Any]],
        *,
        binding_message: str | None,
        requested_expiry: int | None,
        timeout: float | None,
    ) -> Flow[ActionToken]:
        started = time.monotonic()
        details_list = [dict(d) for d in details]
        data = {
            "scope": scope,
            "login_hint_token": session_token,
            "authorization_details": json.dumps(details_list, separators=(",", ":"), ensure_ascii=False),
        }
        if binding_message is not None:
            data["binding_message"] = binding_message
        if requested_expiry is not None:
            data["requested_expiry"] = str(int(requested_expiry))
        notification_token = secrets.token_urlsafe(32) if self.ping_mode else None
        if notification_token:
            data["client_notification_token"] = notification_token
        # CIBA Core §7.1: the issuer is a valid audience for an assertion sent to this endpoint.
        status, body = yield from self._post_flow(
            "backchannel_authentication_endpoint", data, audience=self.issuer
        )
        if status != 200:
            error = body.get("error")
            if error == "expired_login_hint_token":
                raise _LoginHintExpired()
            if error in ("access_denied", "invalid_grant"):
                raise _error(status, body, GrantRevoked)
            raise _error(status, body)
        auth_req_id = body.get("auth_req_id")
        if not isinstance(auth_req_id, str) or not auth_req_id:
            raise OAuthError(
                "invalid_response", "the backchannel response has no auth_req_id", status_code=status
            )
        interval = float(body.get("interval") or DEFAULT_INTERVAL)
        expires_in = float(body.get("expires_in") or 0)
        window_ends = started + expires_in
        gives_up = started + timeout if timeout is not None else float("inf")
        if notification_token:
            with self._events_lock:
                self._notification_tokens[auth_req_id] = notification_token
        try:
            while True:
                now = time.monotonic()
                if now >= gives_up:
                    raise ApprovalTimeout(
                        "timeout", "no answer within the caller's timeout", auth_req_id=auth_req_id
                    )
                yield _Wait(min(interval, gives_up - now), auth_req_id)
                status, body = yield from self._post_flow(
                    "token_endpoint", {"grant_type": GRANT_TYPE_CIBA, "auth_req_id": auth_req_id}, dpop=True
                )
                if status == 200 and isinstance(body.get("access_token"), str):
                    return self._action_token(body, details_list, auth_req_id)
                error = body.get("error")
                if error == "authorization_pending":
                    pass
                elif error == "slow_down":
                    interval += SLOW_DOWN_STEP
                else:
                    raise self._poll_error(status, body, auth_req_id)
                if time.monotonic() > window_ends + interval + 5:
                    raise ApprovalExpired(
                        "expired_token", "the approval window has passed", auth_req_id=auth_req_id
                    )
        finally:
            with self._events_lock:
                self._events.pop(auth_req_id, None)
                self._pinged.discard(auth_req_id)
                self._notification_tokens.pop(auth_req_id, None)

    @staticmethod
    def _poll_error(status: int, body: Mapping[str, Any], auth_req_id: str) -> ApprovalError:
        """CIBA Core §11 token errors to exceptions."""
        error = str(body.get("error") or f"http_{status}")
        description = str(body.get("error_description") or "")
        reason = str(body.get("reason") or error)  # the server's stable name of the refusal
        cls: type[ApprovalError] = ApprovalError
        if error == "access_denied":
            cls = GrantRevoked if reason == "cancelled" else ApprovalDenied
        elif error == "expired_token":
            cls = ApprovalExpired
        elif error == "invalid_grant":
            cls = GrantRevoked if reason == "grant_inactive" else ApprovalError
        return cls(error, description, status_code=status, auth_req_id=auth_req_id)

    @staticmethod
    def _action_token(
        body: Mapping[str, Any], requested: list[dict[str, Any]], auth_req_id: str
    ) -> ActionToken:
        approved = body.get("authorization_details")
        if not isinstance(approved, list) or action_hash(approved) != action_hash(requested):
            raise ApprovalError(
                "invalid_response",
                "the approved authorization_details differ from the request",
                auth_req_id=auth_req_id,
            )
        return ActionToken(
            token=str(body["access_token"]),
            expires_in=int(body.get("expires_in") or 0),
            authorization_details=approved,
            scope=str(body.get("scope") or ""),
            token_type=str(body.get("token_type") or "Bearer"),
            auth_req_id=auth_req_id,
        )

    def on_ping(self, auth_req_id: str, *, authorization: str | None = None) -> bool:
        """CIBA Core §10.2 ping callback: wake the ``request_approval`` waiting on
        ``auth_req_id`` so it polls at once. Pass the callback's ``Authorization`` header to
        have the ``client_notification_token`` checked (returns False if it does not match)."""
        with self._events_lock:
            expected = self._notification_tokens.get(auth_req_id)
            if authorization is not None:
                if expected is None or not secrets.compare_digest(authorization, f"Bearer {expected}"):
                    return False
            if len(self._pinged) < 10_000:
                self._pinged.add(auth_req_id)
            waiter = self._events.get(auth_req_id)
        if waiter is not None:
            self._wake(waiter)
        return True

    def _wake(self, waiter: Any) -> None:
        waiter.set()

    def _take_ping(self, auth_req_id: str) -> bool:
        with self._events_lock:
            if auth_req_id in self._pinged:
                self._pinged.discard(auth_req_id)
                return True
            return False


class AgentClient(_AgentCore):
    """Synchronous agent client (``httpx.Client``). Thread-safe: one re-mint at a time, so a
    rotating refresh token is never used twice (which would revoke the grant, RFC 9700 §4.14.2).

    ``private_key`` (a ``cryptography`` private key, its ``key_id`` the registered ``kid``)
    enables ``private_key_jwt`` and re-minting by token exchange; ``dpop_key`` enables DPoP;
    ``instance`` makes it one instance of the agent (pass ``dpop_key=instance.key`` to bind its
    tokens to the instance key too).
    """

    def __init__(
        self,
        issuer: str,
        client_id: str,
        *,
        client_secret: str | None = None,
        private_key: PrivateKey | None = None,
        key_id: str | None = None,
        redirect_uri: str | None = None,
        http: httpx.Client | None = None,
        dpop_key: DPoPKey | PrivateKey | None = None,
        refresh_margin: float = 30.0,
        ping_mode: bool = False,
        instance: AgentInstance | None = None,
    ) -> None:
        super().__init__(
            issuer,
            client_id,
            client_secret=client_secret,
            private_key=private_key,
            key_id=key_id,
            redirect_uri=redirect_uri,
            dpop_key=dpop_key,
            refresh_margin=refresh_margin,
            ping_mode=ping_mode,
            instance=instance,
        )
        self._http = http or httpx.Client(timeout=15.0, follow_redirects=False)
        self._lock = threading.Lock()

    def _run(self, flow: Flow[T]) -> T:
        reply: Any = None
        try:
            while True:
                try:
                    step = flow.send(reply)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                if isinstance(step, _Http):
                    reply = self._http.request(step.method, step.url, data=step.data, headers=step.headers)
                else:
                    self._wait(step)
                    reply = None
        finally:
            flow.close()

    def _wait(self, step: _Wait) -> None:
        if self._take_ping(step.auth_req_id):
            return
        with self._events_lock:
            event = self._events.setdefault(step.auth_req_id, threading.Event())
        if event.wait(step.seconds):
            event.clear()
            self._take_ping(step.auth_req_id)

    def metadata(self) -> dict[str, Any]:
        """The authorization server's RFC 8414 metadata (fetched once)."""
        return self._run(self._metadata_flow())

    def authorization_url(
        self, scopes: Iterable[str] | str, state: str | None = None
    ) -> tuple[str, str, str]:
        """``(url, state, code_verifier)`` to send the user to (RFC 6749 §4.1.1, PKCE S256 RFC 7636 §4.2)."""
        return self._run(self._authorization_url_flow(scopes, state))

    def exchange_code(self, code: str, code_verifier: str) -> TokenSet:
        """Redeem the authorization code (RFC 6749 §4.1.3) and keep the session tokens."""
        return self._run(self._exchange_code_flow(code, code_verifier))

    def remint(self) -> TokenSet:
        """Re-mint the session token now (refresh or token exchange), whatever its expiry."""
        with self._lock:
            return self._run(self._remint_flow())

    def get_access_token(self) -> str:
        """The session access token, re-minted first if it expires within ``refresh_margin``."""
        fresh = self._fresh()
        if fresh is not None:
            return fresh.access_token
        with self._lock:
            fresh = self._fresh()  # another thread may have re-minted meanwhile
            if fresh is not None:
                return fresh.access_token
            return self._run(self._remint_flow()).access_token

    @property
    def access_token(self) -> str:
        """See :meth:`get_access_token`."""
        return self.get_access_token()

    def headers_for(self, method: str, url: str) -> dict[str, str]:
        """Headers to call a resource server with a fresh session token (DPoP proof included)."""
        self.get_access_token()
        return self.auth_headers(method, url)

    def request_approval(
        self,
        scope: str,
        authorization_details: Sequence[Mapping[str, Any]],
        *,
        binding_message: str | None = None,
        requested_expiry: int | None = None,
        timeout: float | None = None,
    ) -> ActionToken:
        """Ask the user to approve one action (CIBA Core §7.1) and wait for the action token.

        Raises :class:`ApprovalDenied`, :class:`ApprovalExpired`, :class:`GrantRevoked`,
        :class:`ApprovalTimeout` (``timeout`` seconds passed) or :class:`SessionEnded`.
        """
        for attempt in range(2):
            token = self.get_access_token() if attempt == 0 else self.remint().access_token
            try:
                return self._run(
                    self._approval_flow(
                        token,
                        scope,
                        authorization_details,
                        binding_message=binding_message,
                        requested_expiry=requested_expiry,
                        timeout=timeout,
                    )
                )
            except _LoginHintExpired:
                continue
        raise SessionEnded("expired_login_hint_token", "the session token expired while asking for approval")

    def end_session(self) -> bool:
        """End the session grant now (RFC 7009 revocation) instead of leaving it live until it
        expires: a finished run should hold no access. False if there was no session."""
        with self._lock:
            return self._run(self._end_session_flow())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAgentClient(_AgentCore):
    """The same client for asyncio (``httpx.AsyncClient``); methods are coroutines.

    ``on_ping`` may be called from the event loop or from another thread.
    """

    def __init__(
        self,
        issuer: str,
        client_id: str,
        *,
        client_secret: str | None = None,
        private_key: PrivateKey | None = None,
        key_id: str | None = None,
        redirect_uri: str | None = None,
        http: httpx.AsyncClient | None = None,
        dpop_key: DPoPKey | PrivateKey | None = None,
        refresh_margin: float = 30.0,
        ping_mode: bool = False,
        instance: AgentInstance | None = None,
    ) -> None:
        super().__init__(
            issuer,
            client_id,
            client_secret=client_secret,
            private_key=private_key,
            key_id=key_id,
            redirect_uri=redirect_uri,
            dpop_key=dpop_key,
            refresh_margin=refresh_margin,
            ping_mode=ping_mode,
            instance=instance,
        )
        self._http = http or httpx.AsyncClient(timeout=15.0, follow_redirects=False)
        self._lock: asyncio.Lock | None = None

    def _remint_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _run(self, flow: Flow[T]) -> T:
        reply: Any = None
        try:
            while True:
                try:
                    step = flow.send(reply)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                if isinstance(step, _Http):
                    reply = await self._http.request(
                        step.method, step.url, data=step.data, headers=step.headers
                    )
                else:
                    await self._wait(step)
                    reply = None
        finally:
            flow.close()

    async def _wait(self, step: _Wait) -> None:
        if self._take_ping(step.auth_req_id):
            return
        loop = asyncio.get_running_loop()
        with self._events_lock:
            waiter = self._events.get(step.auth_req_id)
            if waiter is None:
                waiter = self._events[step.auth_req_id] = (loop, asyncio.Event())
        event: asyncio.Event = waiter[1]
        try:
            await asyncio.wait_for(event.wait(), timeout=step.seconds)
        except TimeoutError:
            return
        event.clear()
        self._take_ping(step.auth_req_id)

    def _wake(self, waiter: Any) -> None:
        loop, event = waiter
        loop.call_soon_threadsafe(event.set)

    async def metadata(self) -> dict[str, Any]:
        return await self._run(self._metadata_flow())

    async def authorization_url(
        self, scopes: Iterable[str] | str, state: str | None = None
    ) -> tuple[str, str, str]:
        """See :meth:`AgentClient.authorization_url`."""
        return await self._run(self._authorization_url_flow(scopes, state))

    async def exchange_code(self, code: str, code_verifier: str) -> TokenSet:
        """See :meth:`AgentClient.exchange_code`."""
        return await self._run(self._exchange_code_flow(code, code_verifier))

    async def remint(self) -> TokenSet:
        """See :meth:`AgentClient.remint`."""
        async with self._remint_lock():
            return await self._run(self._remint_flow())

    async def get_access_token(self) -> str:
        """See :meth:`AgentClient.get_access_token`."""
        fresh = self._fresh()
        if fresh is not None:
            return fresh.access_token
        async with self._remint_lock():
            fresh = self._fresh()
            if fresh is not None:
                return fresh.access_token
            return (await self._run(self._remint_flow())).access_token

    async def headers_for(self, method: str, url: str) -> dict[str, str]:
        await self.get_access_token()
        return self.auth_headers(method, url)

    async def request_approval(
        self,
        scope: str,
        authorization_details: Sequence[Mapping[str, Any]],
        *,
        binding_message: str | None = None,
        requested_expiry: int | None = None,
        timeout: float | None = None,
    ) -> ActionToken:
        """See :meth:`AgentClient.request_approval`."""
        for attempt in range(2):
            token = await self.get_access_token() if attempt == 0 else (await self.remint()).access_token
            try:
                return await self._run(
                    self._approval_flow(
                        token,
                        scope,
                        authorization_details,
                        binding_message=binding_message,
                        requested_expiry=requested_expiry,
                        timeout=timeout,
                    )
                )
            except _LoginHintExpired:
                continue
        raise SessionEnded("expired_login_hint_token", "the session token expired while asking for approval")

    async def end_session(self) -> bool:
        """See :meth:`AgentClient.end_session`."""
        async with self._remint_lock():
            return await self._run(self._end_session_flow())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

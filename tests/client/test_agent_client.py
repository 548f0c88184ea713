"""AgentClient / AsyncAgentClient against the live stack: consent, token upkeep, step-up approvals.

The agent talks HTTP to the real servers (config.serving) and the Celery worker delivers
prompts; the officer answers in the browser (Django's test client, or real HTTP
for the consent screen). Protocol corners the server cannot be made to produce
on demand (slow_down, use_dpop_nonce, an expired login_hint_token) are driven
through ``httpx.MockTransport``.
"""

import asyncio
import json
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from django.contrib.auth.models import User
from django.db import connection
from jwt.algorithms import ECAlgorithm

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.models import Agent, ScopePolicy
from consent.services import grant_revoke
from countersign import (
    ActionToken,
    AgentClient,
    ApprovalDenied,
    ApprovalTimeout,
    AsyncAgentClient,
    DPoPKey,
    GrantRevoked,
    SessionEnded,
    TokenSet,
    TokenVerifier,
)
from countersign.dpop import ReplayCache, verify_proof
from tests.approvals.conftest import LEDGER_ENTRY
from tests.client import consent_over_http, officer_decides
from tests.conftest import REDIRECT_URI, Scenario
from tests.live import LiveStack

SCOPES = ["catalog:read", "budget:read", "ledger:write"]


class AgentKey:
    """A registered ES256 key for private_key_jwt (as in tests/consent/test_token_exchange.py)."""

    def __init__(self, kid: str = "k1") -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.kid = kid
        self.jwk = {**json.loads(ECAlgorithm.to_jwk(self.private.public_key())), "kid": kid, "alg": "ES256"}


def _consent_in_thread(live: LiveStack, user: User, url: str, state: str) -> str:
    try:
        return consent_over_http(live, user, url, state)
    finally:
        connection.close()  # this worker thread's own connection


def _client(live: LiveStack, scenario: Scenario, **kwargs: Any) -> AgentClient:
    kwargs.setdefault("client_secret", scenario.agent_secret)
    return AgentClient(live.url, scenario.agent.client_id, redirect_uri=REDIRECT_URI, **kwargs)


def _connect(live: LiveStack, scenario: Scenario, client: AgentClient) -> None:
    url, state, verifier = client.authorization_url(SCOPES)
    client.exchange_code(consent_over_http(live, scenario.user, url, state), verifier)


def _tokens(client: AgentClient) -> TokenSet:
    """The tokens of a connected client."""
    assert client.tokens is not None
    return client.tokens


@pytest.fixture
def agent(live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy) -> Iterator[AgentClient]:  # noqa: F811
    client = _client(live, scenario)
    _connect(live, scenario, client)
    yield client
    client.close()


@pytest.fixture
def catalog(live: LiveStack, scenario: Scenario) -> TokenVerifier:
    return TokenVerifier(
        live.url,
        client_id=scenario.rs_client_id,
        client_secret=scenario.rs_secret,
        audience=scenario.rs_audience,
    )


# --- session grant ---------------------------------------------------------------------------------


def test_authorization_url_uses_pkce_s256(live: LiveStack, scenario: Scenario) -> None:
    client = _client(live, scenario)
    url, state, verifier = client.authorization_url(SCOPES)
    query = {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
    assert url.startswith(f"{live.url}/o/authorize/?")
    assert query["code_challenge_method"] == "S256" and query["state"] == state and 43 <= len(verifier) <= 128
    assert query["code_challenge"] != verifier and query["scope"] == " ".join(SCOPES)
    assert query["redirect_uri"] == REDIRECT_URI and query["client_id"] == scenario.agent.client_id


def test_code_exchange_gives_a_session_the_resource_server_accepts(
    live: LiveStack, scenario: Scenario, agent: AgentClient, catalog: TokenVerifier
) -> None:
    assert agent.tokens is not None and agent.tokens.refresh_token  # seeded agent: rotating mode
    verified = catalog.verify_session(agent.access_token, required_scopes=["catalog:read"])
    assert (
        verified.subject == f"user:{scenario.user.pk}"
        and verified.actor == f"agent:{scenario.agent.client_id}"
    )
    assert agent.auth_headers("GET", "http://catalog.test/items") == {
        "Authorization": f"Bearer {agent.access_token}"
    }


def test_a_code_is_good_once(live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy) -> None:  # noqa: F811
    client = _client(live, scenario)
    url, state, verifier = client.authorization_url(SCOPES)
    code = consent_over_http(live, scenario.user, url, state)
    client.exchange_code(code, verifier)
    with pytest.raises(Exception, match="invalid_grant"):
        _client(live, scenario).exchange_code(code, verifier)


# --- token upkeep ----------------------------------------------------------------------------------


SHORT_TTL, DUE_AFTER = 32, 2.2  # with the client's 30 s margin, a 32 s token is due for re-minting after 2 s


def _short_ttl(scenario: Scenario, seconds: int = SHORT_TTL) -> None:
    # 30 s is the shortest access-token TTL an admin may set.
    Agent.objects.filter(pk=scenario.agent.pk).update(access_token_ttl=seconds)


def test_rotating_mode_re_mints_with_the_refresh_token(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy, catalog: TokenVerifier
) -> None:  # noqa: F811
    _short_ttl(scenario)
    client = _client(live, scenario)
    _connect(live, scenario, client)
    first, first_refresh = _tokens(client).access_token, _tokens(client).refresh_token
    assert client.access_token == first  # still fresh
    time.sleep(DUE_AFTER)
    second = client.access_token
    assert second != first and _tokens(client).refresh_token not in (None, first_refresh)  # rotated
    assert catalog.verify_session(second).grant_id == catalog.verify_session(first).grant_id
    assert AuditEvent.objects.filter(event="token.refreshed").count() == 1


def test_concurrent_callers_share_one_refresh(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy
) -> None:  # noqa: F811
    """A second refresh with the same (rotated) refresh token would revoke the grant (reuse detection)."""
    _short_ttl(scenario)
    client = _client(live, scenario)
    _connect(live, scenario, client)
    time.sleep(DUE_AFTER)
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(client.access_token)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1
    assert AuditEvent.objects.filter(event="token.refreshed").count() == 1


def test_exchange_mode_re_mints_by_token_exchange_with_the_agents_key(
    live: LiveStack,
    scenario: Scenario,
    ledger_policy: ScopePolicy,  # noqa: F811
    catalog: TokenVerifier,
) -> None:
    key = AgentKey()
    Agent.objects.filter(pk=scenario.agent.pk).update(
        jwks={"keys": [key.jwk]}, refresh_mode=Agent.RefreshMode.EXCHANGE, access_token_ttl=SHORT_TTL
    )
    client = AgentClient(
        live.url, scenario.agent.client_id, private_key=key.private, key_id=key.kid, redirect_uri=REDIRECT_URI
    )  # no secret at all: private_key_jwt everywhere
    _connect(live, scenario, client)
    assert _tokens(client).refresh_token is None  # exchange mode: no refresh token exists
    first = _tokens(client).access_token
    time.sleep(DUE_AFTER)
    second = client.access_token
    assert second != first
    before, after = catalog.verify_session(first), catalog.verify_session(second)
    assert (after.subject, after.grant_id, after.scopes) == (before.subject, before.grant_id, before.scopes)
    assert AuditEvent.objects.filter(event="token.exchanged").count() == 1
    assert client.remint().access_token not in (first, second)  # explicit re-mint, whatever the expiry


def test_without_refresh_token_or_key_the_session_ends(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy
) -> None:  # noqa: F811
    Agent.objects.filter(pk=scenario.agent.pk).update(
        refresh_mode=Agent.RefreshMode.NONE, access_token_ttl=SHORT_TTL
    )
    client = _client(live, scenario)
    _connect(live, scenario, client)
    time.sleep(DUE_AFTER)
    with pytest.raises(SessionEnded):
        client.get_access_token()


def test_revoked_grant_ends_the_session_at_refresh(
    live: LiveStack, scenario: Scenario, agent: AgentClient
) -> None:
    grant_id = jwt.decode(agent.access_token, options={"verify_signature": False})["grant_id"]
    grant_revoke(grant_id=grant_id, reason="revoked_by_user", actor="test")
    with pytest.raises(SessionEnded) as caught:
        agent.remint()
    assert caught.value.error == "invalid_grant" and agent.tokens is None


# --- step-up approvals (CIBA) --------------------------------------------------------------------


def test_request_approval_returns_an_action_token_the_ledger_redeems(
    live: LiveStack, scenario: Scenario, agent: AgentClient
) -> None:
    with officer_decides(scenario.user):
        action = agent.request_approval(
            "ledger:write", [LEDGER_ENTRY], binding_message="step 5 of 5", timeout=30
        )
    assert action.scope == "ledger:write" and action.authorization_details == [LEDGER_ENTRY]
    assert 0 < action.expires_in <= 120 and not action.dpop_bound
    ledger = TokenVerifier(
        live.url,
        client_id=scenario.ledger_client_id,
        client_secret=scenario.ledger_secret,
        audience="http://ledger.test",
    )
    verified = ledger.verify_action(action.token, expected_details=[LEDGER_ENTRY])
    assert verified.claims["approval_id"] == str(ApprovalRequest.objects.get().pk)
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.REDEEMED


def test_denial_raises_approval_denied(live: LiveStack, scenario: Scenario, agent: AgentClient) -> None:
    with officer_decides(scenario.user, decision="deny"), pytest.raises(ApprovalDenied) as caught:
        agent.request_approval("ledger:write", [LEDGER_ENTRY], timeout=30)
    assert caught.value.error == "access_denied" and caught.value.auth_req_id


def test_revoking_the_grant_while_waiting_raises_grant_revoked(
    live: LiveStack, scenario: Scenario, agent: AgentClient
) -> None:
    def revoke() -> None:
        deadline = time.monotonic() + 10
        while not ApprovalRequest.objects.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        grant_revoke(grant_id=ApprovalRequest.objects.get().grant_id, reason="revoked_by_user", actor="test")
        connection.close()

    threading.Thread(target=revoke, daemon=True).start()
    with pytest.raises(GrantRevoked, match="cancelled"):
        agent.request_approval("ledger:write", [LEDGER_ENTRY], timeout=30)
    with pytest.raises(GrantRevoked):  # and at request time, once the grant is gone
        agent.request_approval("ledger:write", [LEDGER_ENTRY], timeout=30)


def test_caller_timeout(live: LiveStack, scenario: Scenario, agent: AgentClient) -> None:
    started = time.monotonic()
    with pytest.raises(ApprovalTimeout) as caught:
        agent.request_approval("ledger:write", [LEDGER_ENTRY], timeout=1.0)
    assert time.monotonic() - started < 5 and caught.value.auth_req_id
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.PENDING


class _PingReceiver(BaseHTTPRequestHandler):
    """The agent's CIBA notification endpoint (CIBA Core §10.2): hands pings to the client."""

    client: AgentClient | None = None
    results: list[bool] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        client = type(self).client
        assert client is not None
        type(self).results.append(
            client.on_ping(body["auth_req_id"], authorization=self.headers.get("Authorization"))
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_ping_wakes_the_waiting_request_at_once(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy
) -> None:  # noqa: F811
    server = HTTPServer(("127.0.0.1", 0), _PingReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        Agent.objects.filter(pk=scenario.agent.pk).update(
            backchannel_client_notification_endpoint=f"http://127.0.0.1:{server.server_port}/cb"
        )
        client = _client(live, scenario, ping_mode=True)
        _connect(live, scenario, client)
        _PingReceiver.client, _PingReceiver.results = client, []
        with officer_decides(scenario.user):
            started = time.monotonic()
            action = client.request_approval("ledger:write", [LEDGER_ENTRY], timeout=30)
            elapsed = time.monotonic() - started
        assert action.authorization_details == [LEDGER_ENTRY]
        assert _PingReceiver.results == [True]
        assert elapsed < 4.5, f"polled on the 5 s interval instead of on the ping ({elapsed:.1f}s)"
    finally:
        server.shutdown()


def test_ping_with_a_wrong_notification_token_is_ignored() -> None:
    client = AgentClient("https://as.example", "a", client_secret="s", ping_mode=True)
    client._notification_tokens["req-1"] = "right"
    assert client.on_ping("req-1", authorization="Bearer wrong") is False
    assert client.on_ping("req-2", authorization="Bearer right") is False
    assert client.on_ping("req-1", authorization="Bearer right") is True


# --- the async client ------------------------------------------------------------------------------


def test_async_client_end_to_end(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy, catalog: TokenVerifier
) -> None:  # noqa: F811
    _short_ttl(scenario)

    async def run() -> tuple[str, str, ActionToken]:
        async with AsyncAgentClient(
            live.url, scenario.agent.client_id, client_secret=scenario.agent_secret, redirect_uri=REDIRECT_URI
        ) as client:
            url, state, verifier = await client.authorization_url(SCOPES)
            code = await asyncio.to_thread(_consent_in_thread, live, scenario.user, url, state)
            first = (await client.exchange_code(code, verifier)).access_token
            await asyncio.sleep(DUE_AFTER)
            second = await client.get_access_token()
            with officer_decides(scenario.user):
                action = await client.request_approval("ledger:write", [LEDGER_ENTRY], timeout=30)
            return first, second, action

    first, second, action = asyncio.run(run())
    assert first != second and catalog.verify_session(second).scopes == {"catalog:read", "budget:read"}
    assert action.authorization_details == [LEDGER_ENTRY]
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.ISSUED


def test_async_denial(live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy) -> None:  # noqa: F811
    async def run() -> None:
        async with AsyncAgentClient(
            live.url, scenario.agent.client_id, client_secret=scenario.agent_secret, redirect_uri=REDIRECT_URI
        ) as client:
            url, state, verifier = await client.authorization_url(SCOPES)
            await client.exchange_code(
                await asyncio.to_thread(_consent_in_thread, live, scenario.user, url, state), verifier
            )
            with officer_decides(scenario.user, decision="deny"):
                await client.request_approval("ledger:write", [LEDGER_ENTRY], timeout=30)

    with pytest.raises(ApprovalDenied):
        asyncio.run(run())


# --- DPoP at the live token endpoint -----------------------------------------------------------------


def test_dpop_session_with_server_nonce_and_refresh(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy, catalog: TokenVerifier
) -> None:  # noqa: F811
    key = DPoPKey.generate()
    Agent.objects.filter(pk=scenario.agent.pk).update(
        jwks={"keys": [{**key.jwk, "kid": "d1", "alg": "ES256"}]},
        require_dpop=True,
        access_token_ttl=SHORT_TTL,
    )
    client = _client(live, scenario, dpop_key=key)
    _connect(live, scenario, client)  # first proof has no nonce: use_dpop_nonce, then a retry
    assert client.dpop_nonce and _tokens(client).token_type == "DPoP"
    time.sleep(DUE_AFTER)
    refreshed = client.get_access_token()
    assert jwt.decode(refreshed, options={"verify_signature": False})["cnf"] == {"jkt": key.jkt}
    headers = client.headers_for("GET", "http://catalog.test/items")
    assert (
        catalog.verify_session(
            refreshed, dpop_proof=headers["DPoP"], htm="GET", htu="http://catalog.test/items", scheme="DPoP"
        ).dpop_jkt
        == key.jkt
    )
    stranger = _client(live, scenario, dpop_key=DPoPKey.generate())  # a key the agent never registered
    with pytest.raises(Exception, match="invalid_dpop_proof"):
        _connect(live, scenario, stranger)


# --- protocol corners through a mock transport -------------------------------------------------------


class FakeServer:
    """Scripted token-endpoint answers; records every request."""

    issuer = "https://as.example"

    def __init__(self, polls: Iterable[tuple[int, dict[str, Any], dict[str, str]]]) -> None:
        self.polls = list(polls)
        self.requests: list[httpx.Request] = []
        self.asked = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/.well-known/oauth-authorization-server":
            return httpx.Response(
                200,
                json={
                    "issuer": self.issuer,
                    "token_endpoint": f"{self.issuer}/o/token/",
                    "backchannel_authentication_endpoint": f"{self.issuer}/o/bc-authorize/",
                },
            )
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        if path == "/o/bc-authorize/":
            self.asked += 1
            if form["login_hint_token"] == "old":
                return httpx.Response(400, json={"error": "expired_login_hint_token"})
            return httpx.Response(200, json={"auth_req_id": "req-1", "expires_in": 600, "interval": 1})
        if form.get("grant_type") == "refresh_token":
            return httpx.Response(
                200,
                json={
                    "access_token": "new",
                    "token_type": "Bearer",
                    "expires_in": 900,
                    "refresh_token": "r2",
                },
            )
        status, body, headers = self.polls.pop(0)
        return httpx.Response(status, json=body, headers=headers)


def _fake_client(server: FakeServer, *, session_token: str = "old", **kwargs: Any) -> AgentClient:
    client = AgentClient(
        server.issuer,
        "agent-1",
        client_secret="s3cret",
        http=httpx.Client(transport=httpx.MockTransport(server.handler)),
        **kwargs,
    )
    client._store(
        {"access_token": session_token, "token_type": "Bearer", "expires_in": 900, "refresh_token": "r1"}
    )
    return client


def test_slow_down_adds_five_seconds_to_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(
        [
            (400, {"error": "authorization_pending"}, {}),
            (400, {"error": "slow_down"}, {}),
            (400, {"error": "authorization_pending"}, {}),
            (
                200,
                {
                    "access_token": "act",
                    "token_type": "Bearer",
                    "expires_in": 120,
                    "authorization_details": [LEDGER_ENTRY],
                    "scope": "ledger:write",
                },
                {},
            ),
        ]
    )
    client = _fake_client(server)
    waits: list[float] = []
    monkeypatch.setattr(client, "_wait", lambda step: waits.append(step.seconds))
    action = client.request_approval("ledger:write", [LEDGER_ENTRY])
    assert action.token == "act" and waits == [1, 1, 6, 6]


def test_approved_details_must_be_the_requested_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(
        [
            (
                200,
                {
                    "access_token": "act",
                    "expires_in": 120,
                    "scope": "ledger:write",
                    "authorization_details": [{**LEDGER_ENTRY, "amount": "1.00"}],
                },
                {},
            )
        ]
    )
    client = _fake_client(server)
    monkeypatch.setattr(client, "_wait", lambda step: None)
    with pytest.raises(Exception, match="differ"):
        client.request_approval("ledger:write", [LEDGER_ENTRY])


def test_expired_login_hint_token_re_mints_and_asks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(
        [
            (
                200,
                {
                    "access_token": "act",
                    "expires_in": 120,
                    "scope": "ledger:write",
                    "authorization_details": [LEDGER_ENTRY],
                },
                {},
            )
        ]
    )
    client = _fake_client(server)
    monkeypatch.setattr(client, "_wait", lambda step: None)
    assert client.request_approval("ledger:write", [LEDGER_ENTRY]).token == "act"
    assert (
        server.asked == 2 and _tokens(client).access_token == "new" and _tokens(client).refresh_token == "r2"
    )


def test_dpop_nonce_retry_sends_a_fresh_proof_with_the_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    key = DPoPKey.generate()
    server = FakeServer(
        [
            (400, {"error": "use_dpop_nonce"}, {"DPoP-Nonce": "n-1"}),
            (
                200,
                {
                    "access_token": "act",
                    "token_type": "DPoP",
                    "expires_in": 120,
                    "authorization_details": [LEDGER_ENTRY],
                },
                {"DPoP-Nonce": "n-2"},
            ),
        ]
    )
    client = _fake_client(server, session_token="current", dpop_key=key)
    monkeypatch.setattr(client, "_wait", lambda step: None)
    action = client.request_approval("ledger:write", [LEDGER_ENTRY])
    assert action.dpop_bound and client.dpop_nonce == "n-2"
    first, second = [r.headers["DPoP"] for r in server.requests if r.url.path == "/o/token/"]
    cache = ReplayCache(120)
    assert (
        "nonce"
        not in verify_proof(first, htm="POST", htu=f"{server.issuer}/o/token/", replay_cache=cache).claims
    )
    assert (
        verify_proof(
            second,
            htm="POST",
            htu=f"{server.issuer}/o/token/",
            nonce="n-1",
            expected_jkt=key.jkt,
            replay_cache=cache,
        ).jkt
        == key.jkt
    )
    headers = client.auth_headers("POST", "https://ledger.example/e?x=1", token=action)
    assert headers["Authorization"] == "DPoP act"
    proof = verify_proof(headers["DPoP"], htm="POST", htu="https://ledger.example/e", access_token="act")
    assert proof.claims["htu"] == "https://ledger.example/e"


def test_client_assertion_is_rfc7523_shaped() -> None:
    key = AgentKey()
    client = AgentClient("https://as.example", "agent-1", private_key=key.private, key_id="k1")
    assertion = client.client_assertion("https://as.example/o/token/")
    assert jwt.get_unverified_header(assertion)["kid"] == "k1"
    claims = jwt.decode(
        assertion, key.private.public_key(), algorithms=["ES256"], audience="https://as.example/o/token/"
    )
    assert claims["iss"] == claims["sub"] == "agent-1" and claims["exp"] - claims["iat"] == 60
    assert client.client_assertion("x") != client.client_assertion("x")  # fresh jti each time


# --- ending the session -----------------------------------------------------------------------------


def test_end_session_ends_the_grant_at_once(
    live: LiveStack, scenario: Scenario, agent: AgentClient, catalog: TokenVerifier
) -> None:
    from consent.models import SessionGrant

    token = agent.access_token
    assert catalog.verify_session(token).subject
    assert agent.end_session() is True
    grant = SessionGrant.objects.get()
    assert grant.status == SessionGrant.Status.REVOKED and grant.end_reason == "revoked_by_agent"
    assert agent.tokens is None and agent.end_session() is False
    response = httpx.post(
        f"{live.url}/o/introspect/", data={"token": token}, auth=(scenario.rs_client_id, scenario.rs_secret)
    )
    assert response.json() == {"active": False}

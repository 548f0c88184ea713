"""Fixtures that build real objects through the services, and a client that speaks OAuth."""

import base64
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.http import HttpResponse
from django.test import Client
from pytest_django import DjangoDbBlocker

from consent.keys import reset_key_cache
from consent.models import Agent, ScopePolicy
from consent.services import agent_create, resource_server_create, scope_set
from consent.tokens import forget_audiences
from tests.live import live, live_stack  # noqa: F401  (fixtures: the real server and worker)

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse

    # What the test client returns: an HttpResponse with .json(), .context and the rest attached.
    ClientResponse: TypeAlias = _MonkeyPatchedWSGIResponse
else:
    ClientResponse = HttpResponse

REDIRECT_URI = "http://127.0.0.1:8199/callback"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: DjangoDbBlocker) -> Iterator[None]:
    """Tests that commit (``transaction=True``) are emptied by TRUNCATE afterwards, which the audit
    tables refuse unless their owner lifts it for the session: this test database's sessions do."""
    from django.db import connection

    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    f"ALTER DATABASE {connection.ops.quote_name(connection.settings_dict['NAME'])} "
                    "SET countersign.audit_truncate = 'allow'"
                )
            connection.close()
            if hasattr(connection, "close_pool"):
                connection.close_pool()  # pooled sessions started before the default was set
    yield


@pytest.fixture(autouse=True)
def _fresh_limits() -> Iterator[None]:
    # Rate counters, lockouts and login attempts live in Redis: each test starts from none.
    from consent.limits import store

    store.reset()
    yield


@pytest.fixture(autouse=True)
def _fresh_key_cache() -> Iterator[None]:
    # Each test database starts without keys; a key cached by an earlier test must not leak in.
    from approvals.wording import forget_wording

    reset_key_cache()
    forget_audiences()
    forget_wording()
    yield
    reset_key_cache()
    forget_audiences()
    forget_wording()


@dataclass
class Scenario:
    agent: Agent
    agent_secret: str
    rs_client_id: str
    rs_secret: str
    rs_audience: str
    ledger_client_id: str
    ledger_secret: str
    user: User


@pytest.fixture
def scenario(db: None) -> Scenario:
    for name, aud, sens in [
        ("catalog:read", "http://catalog.test", ScopePolicy.Sensitivity.STANDARD),
        ("budget:read", "http://budget.test", ScopePolicy.Sensitivity.STANDARD),
        ("ledger:write", "http://ledger.test", ScopePolicy.Sensitivity.STEP_UP),
    ]:
        scope_set(name=name, values={"audience": aud, "sensitivity": sens, "description": f"Use {name}"})
    catalog, catalog_secret = resource_server_create(name="Catalog", audience="http://catalog.test")
    ledger, ledger_secret = resource_server_create(name="Ledger", audience="http://ledger.test")
    agent, secret = agent_create(
        name="Procurement Agent",
        publisher="Acme Agents",
        scopes=["catalog:read", "budget:read", "ledger:write"],
        redirect_uris=[REDIRECT_URI],
    )
    user = get_user_model().objects.create_user("officer", password=PASSWORD)
    return Scenario(
        agent,
        secret,
        catalog.client_id,
        catalog_secret,
        catalog.audience,
        ledger.client_id,
        ledger_secret,
        user,
    )


@pytest.fixture
def ledger_policy(scenario: Scenario) -> ScopePolicy:
    policy = ScopePolicy.objects.get(name="ledger:write")
    policy.authorization_details_types = ["ledger_entry"]
    policy.description = "Financial ledger"
    policy.save()
    return policy


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


class OAuthFlow:
    """Drives the authorization-code flow through Django's test client, as a browser and an agent would."""

    def __init__(self, client: Client, scenario: Scenario) -> None:
        self.client = client
        self.s = scenario

    def login(self) -> None:
        assert self.client.login(username="officer", password=PASSWORD)

    def authorize_query(
        self,
        *,
        scope: str = "catalog:read budget:read ledger:write",
        challenge: str | None = None,
        method: str | None = "S256",
        redirect_uri: str = REDIRECT_URI,
        client_id: str | None = None,
        **extra: str,
    ) -> str:
        params = {
            "response_type": "code",
            "client_id": client_id or self.s.agent.client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": "st-123",
        }
        if challenge is not None:
            params["code_challenge"] = challenge
        if method is not None and challenge is not None:
            params["code_challenge_method"] = method
        params.update(extra)
        return urlencode(params)

    def consent(self, query: str, decision: str = "allow", lifetime: int | str = 3600) -> ClientResponse:
        return self.client.post(
            "/o/authorize/", {"authz_query": query, "decision": decision, "lifetime": str(lifetime)}
        )

    def code_from(self, response: ClientResponse) -> str:
        assert response.status_code == 302, response.content[:500]
        params = parse_qs(urlparse(response["Location"]).query)
        assert params["state"] == ["st-123"]
        assert params["iss"] == [settings.COUNTERSIGN["ISSUER"]]  # RFC 9207 mix-up defence
        return params["code"][0]

    def token(self, data: dict[str, str], *, auth: tuple[str, str] | None = None) -> ClientResponse:
        client_id, secret = auth or (self.s.agent.client_id, self.s.agent_secret)
        return self.client.post(
            "/o/token/",
            urlencode(data),
            content_type="application/x-www-form-urlencoded",
            HTTP_AUTHORIZATION=basic(client_id, secret),
        )

    def full(self, scope: str = "catalog:read budget:read ledger:write") -> dict[str, Any]:
        """Log in, consent, exchange the code; returns the token response JSON."""
        self.login()
        verifier, challenge = pkce_pair()
        code = self.code_from(self.consent(self.authorize_query(scope=scope, challenge=challenge)))
        response = self.token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
            }
        )
        assert response.status_code == 200, response.content
        body: dict[str, Any] = response.json()
        return body

    def introspect(self, token: str, *, auth: tuple[str, str] | None = None) -> ClientResponse:
        client_id, secret = auth or (self.s.rs_client_id, self.s.rs_secret)
        return self.client.post(
            "/o/introspect/",
            urlencode({"token": token}),
            content_type="application/x-www-form-urlencoded",
            HTTP_AUTHORIZATION=basic(client_id, secret),
        )


@pytest.fixture
def flow(client: Client, scenario: Scenario) -> OAuthFlow:
    return OAuthFlow(client, scenario)


@pytest.fixture
def session_token(flow: OAuthFlow, ledger_policy: ScopePolicy) -> str:
    """The scenario agent's session token, with the test client signed out again (tests that then
    act as the agent, and see the user only through an inbox or a page)."""
    token: str = flow.full()["access_token"]
    flow.client.logout()
    return token

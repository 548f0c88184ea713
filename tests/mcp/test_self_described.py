"""Agents that were never registered: Client ID Metadata Documents and RFC 7591 dynamic registration.

Every refusal is the right error, changes nothing (no agent, grant, code or token row) and leaves one
audit row; development (the tests' http loopback issuer) accepts loopback documents, production refuses
http, private, loopback and link-local addresses.
"""

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from pytest_django import Settings

from consent.models import Agent
from consent.oauth.cimd import cache_until
from tests.conftest import ClientResponse, OAuthFlow, Scenario, pkce_pair
from tests.consent.test_bad_input import Watch, _assert_error_page, _json_error
from tests.mcp.docserver import DocumentServer

pytestmark = pytest.mark.django_db

CALLBACK = "http://127.0.0.1/callback"  # RFC 8252 §7.3: any port at request time


@pytest.fixture
def docs() -> Iterator[DocumentServer]:
    server = DocumentServer()
    yield server
    server.close()


@pytest.fixture
def production(settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "ISSUER": "https://auth.example"}


def _document(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "client_id": url,
        "client_name": "Desk Agent",
        "redirect_uris": [CALLBACK],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        **overrides,
    }


def _authorize(
    flow: OAuthFlow,
    client_id: str,
    *,
    redirect_uri: str = "http://127.0.0.1:43117/callback",
    scope: str = "catalog:read",
) -> ClientResponse:
    flow.login()
    _, challenge = pkce_pair()
    return flow.client.get(
        "/o/authorize/?"
        + flow.authorize_query(
            client_id=client_id, redirect_uri=redirect_uri, scope=scope, challenge=challenge
        )
    )


class AgentWatch(Watch):
    def __init__(self) -> None:
        super().__init__()
        self.agents = Agent.objects.count()

    def assert_nothing_changed(self, **expected_changes: int) -> None:
        super().assert_nothing_changed(**expected_changes)
        assert Agent.objects.count() == self.agents


# --- Client ID Metadata Documents -----------------------------------------------------------------


def test_a_metadata_document_makes_a_self_described_agent_and_the_consent_screen_says_so(
    flow: OAuthFlow, docs: DocumentServer
) -> None:
    url = docs.put(
        "/agents/desk.json",
        _document(docs.url("/agents/desk.json")),
        headers={"Cache-Control": "max-age=600"},
    )
    response = _authorize(flow, url)
    assert response.status_code == 200, response.content[:400]
    page = response.content.decode()
    assert "described itself" in page and "127.0.0.1" in page and "Desk Agent" in page
    agent = Agent.objects.get(client_id=url)
    assert agent.registration == Agent.Registration.METADATA_DOCUMENT and agent.is_self_described
    assert agent.status == Agent.Status.ACTIVE  # development: an http loopback issuer
    assert agent.client_type == Agent.CLIENT_PUBLIC and agent.metadata_source == url
    assert agent.client_metadata["client_name"] == "Desk Agent"
    _authorize(flow, url)
    assert docs.hits["/agents/desk.json"] == 1  # cached per Cache-Control


def test_a_self_described_public_agent_completes_the_flow_without_a_secret(
    flow: OAuthFlow, docs: DocumentServer
) -> None:
    from urllib.parse import parse_qs, urlencode, urlparse

    url = docs.put("/agents/desk.json", _document(docs.url("/agents/desk.json")))
    flow.login()
    verifier, challenge = pkce_pair()
    redirect_uri = "http://127.0.0.1:43117/callback"
    query = flow.authorize_query(
        client_id=url, redirect_uri=redirect_uri, scope="catalog:read", challenge=challenge
    )
    assert flow.client.get("/o/authorize/?" + query).status_code == 200
    consent = flow.consent(query)
    assert consent.status_code == 302, consent.content[:300]
    code = parse_qs(urlparse(consent["Location"]).query)["code"][0]
    response = flow.client.post(
        "/o/token/",
        urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
                "client_id": url,
                "resource": "http://catalog.test",
            }
        ),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200, response.content
    assert response.json()["scope"] == "catalog:read"


@pytest.mark.parametrize(
    "case",
    [
        "client_id_differs",
        "redirect_uri_not_listed",
        "redirects",
        "oversized",
        "not_json",
        "secret_auth",
        "http_status",
    ],
)
def test_a_bad_metadata_document_is_refused_and_stores_nothing(
    flow: OAuthFlow, docs: DocumentServer, case: str
) -> None:
    path = f"/agents/{case}.json"
    url = docs.url(path)
    if case == "client_id_differs":
        docs.put(path, _document(docs.url("/agents/someone-else.json")))
    elif case == "redirect_uri_not_listed":
        docs.put(path, _document(url, redirect_uris=["https://desk.example/cb"]))
    elif case == "redirects":
        docs.put(path, b"", status=302, headers={"Location": docs.url("/agents/desk.json")})
        docs.put("/agents/desk.json", _document(docs.url("/agents/desk.json")))
    elif case == "oversized":
        docs.put(path, _document(url, client_uri="https://x.example/" + "a" * 200, padding="p" * 6000))
    elif case == "not_json":
        docs.put(path, b"<html>", headers={"Content-Type": "text/html"})
    elif case == "secret_auth":
        docs.put(path, _document(url, token_endpoint_auth_method="client_secret_basic"))
    else:
        docs.put(path, b"{}", status=500)
    watch = AgentWatch()
    response = _authorize(flow, url)
    _assert_error_page(response, status=401)
    row = watch.assert_one_refusal(error="invalid_client", event="client_metadata.refused")
    assert row.client_id == url
    watch.assert_nothing_changed()


def test_a_slow_document_is_cut_off_in_bounded_time(
    flow: OAuthFlow, docs: DocumentServer, settings: Settings
) -> None:
    import time

    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "CIMD_TIMEOUT_SECONDS": 1.0}
    docs.slow.add("/agents/slow.json")
    watch = AgentWatch()
    started = time.monotonic()
    response = _authorize(flow, docs.url("/agents/slow.json"))
    assert time.monotonic() - started < 3
    _assert_error_page(response, status=401)
    row = watch.assert_one_refusal(error="invalid_client", event="client_metadata.refused")
    assert "too long" in row.detail["reason"]
    watch.assert_nothing_changed()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/agents/a.json",
        "https://127.0.0.1:9/agents/a.json",
        "https://10.1.2.3/agents/a.json",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/agents/a.json",
        "https://192.168.0.10/agents/a.json",
        "https://localhost/agents/a.json",
    ],
)
def test_production_refuses_http_private_loopback_and_link_local_documents(
    flow: OAuthFlow, production: None, url: str
) -> None:
    watch = AgentWatch()
    response = _authorize(flow, url, redirect_uri="https://desk.example/cb")
    _assert_error_page(response, status=401)
    watch.assert_one_refusal(error="invalid_client", event="client_metadata.refused")
    watch.assert_nothing_changed()


def test_cache_lifetime_honours_max_age_within_floor_and_ceiling(settings: Settings) -> None:
    from django.utils import timezone

    now = timezone.now()
    assert (cache_until("public, max-age=600", now) - now).total_seconds() == 600
    assert (cache_until("max-age=999999999", now) - now).total_seconds() == 86400
    assert (cache_until("no-store", now) - now).total_seconds() == 60
    assert (cache_until("", now) - now).total_seconds() == 60


def test_production_self_described_agents_start_pending_review_without_step_up(
    flow: OAuthFlow, docs: DocumentServer, production: None
) -> None:
    from consent.oauth.client_metadata import parse
    from consent.selfdescribed import agent_register

    agent, _ = agent_register(
        metadata=parse(
            {"redirect_uris": ["https://desk.example/cb"], "token_endpoint_auth_method": "none"},
            secrets_allowed=True,
        ),
        source="203.0.113.9",
    )
    assert agent.status == Agent.Status.PENDING_REVIEW
    flow.login()
    _, challenge = pkce_pair()
    watch = AgentWatch()
    response = flow.client.get(
        "/o/authorize/?"
        + flow.authorize_query(
            client_id=agent.client_id,
            redirect_uri="https://desk.example/cb",
            scope="catalog:read ledger:write",
            challenge=challenge,
        )
    )
    assert response.status_code == 302 and "error=invalid_scope" in response["Location"]
    watch.assert_one_refusal(error="invalid_scope")
    ok = flow.client.get(
        "/o/authorize/?"
        + flow.authorize_query(
            client_id=agent.client_id,
            redirect_uri="https://desk.example/cb",
            scope="catalog:read",
            challenge=challenge,
        )
    )
    assert ok.status_code == 200 and "until an administrator reviews it" in ok.content.decode()


# --- RFC 7591 dynamic registration ------------------------------------------------------------------


def _register(client: Client, body: object, **headers: Any) -> ClientResponse:
    return client.post(
        "/o/register/",
        json.dumps(body) if not isinstance(body, bytes) else body,
        content_type="application/json",
        **headers,
    )


def test_registration_creates_a_self_described_agent(client: Client, scenario: Scenario) -> None:
    response = _register(
        client,
        {
            "client_name": "Cursor",
            "redirect_uris": ["http://127.0.0.1:33418/cb"],
            "token_endpoint_auth_method": "none",
            "scope": "catalog:read ledger:write",
        },
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert "client_secret" not in body and body["token_endpoint_auth_method"] == "none"
    agent = Agent.objects.get(client_id=body["client_id"])
    assert agent.registration == Agent.Registration.DYNAMIC and agent.allowed_scopes == [
        "catalog:read",
        "ledger:write",
    ]
    confidential = _register(client, {"redirect_uris": ["https://app.example/cb"]})
    assert confidential.status_code == 201 and confidential.json()["client_secret"]
    assert confidential.json()["token_endpoint_auth_method"] == "client_secret_basic"


@pytest.mark.parametrize(
    "body,error",
    [
        ({"redirect_uris": []}, "invalid_redirect_uri"),
        ({"redirect_uris": ["http://app.example/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://app.example/cb#x"]}, "invalid_redirect_uri"),
        (
            {"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "tls_client_auth"},
            "invalid_client_metadata",
        ),
        (
            {"redirect_uris": ["https://app.example/cb"], "grant_types": ["client_credentials"]},
            "invalid_client_metadata",
        ),
        (b"[" * 100, "invalid_client_metadata"),
        (b"{" + b'"a":"' + b"x" * 9000 + b'"}', "invalid_client_metadata"),
    ],
)
def test_bad_registrations_are_refused_and_store_nothing(
    client: Client, scenario: Scenario, body: dict[str, Any] | bytes, error: str
) -> None:
    watch = AgentWatch()
    response = _register(client, body)
    _json_error(response, 400, error)
    watch.assert_one_refusal(error=error, event="registration.refused")
    watch.assert_nothing_changed()


def test_registration_policy_off_and_initial_access_token(
    client: Client, scenario: Scenario, settings: Settings
) -> None:
    from consent.metadata import server_metadata

    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "CLIENT_REGISTRATION": "off"}
    assert "registration_endpoint" not in server_metadata()
    watch = AgentWatch()
    _json_error(_register(client, {"redirect_uris": ["https://app.example/cb"]}), 403, "access_denied")
    watch.assert_one_refusal(error="access_denied", event="registration.refused")
    watch.assert_nothing_changed()
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "CLIENT_REGISTRATION": "initial_access_token",
        "REGISTRATION_ACCESS_TOKENS": ["iat-secret-1"],
    }
    watch = AgentWatch()
    refused = _register(
        client, {"redirect_uris": ["https://app.example/cb"]}, HTTP_AUTHORIZATION="Bearer wrong"
    )
    _json_error(refused, 401, "invalid_token")
    assert refused["WWW-Authenticate"].startswith("Bearer ")
    watch.assert_one_refusal(error="invalid_token", event="registration.refused")
    watch.assert_nothing_changed()
    ok = _register(
        client, {"redirect_uris": ["https://app.example/cb"]}, HTTP_AUTHORIZATION="Bearer iat-secret-1"
    )
    assert ok.status_code == 201


def test_a_registration_flood_is_rate_limited_and_audited_once(client: Client, scenario: Scenario) -> None:
    statuses = [
        _register(client, {"redirect_uris": ["https://app.example/cb"]}).status_code for _ in range(25)
    ]
    assert statuses[:20] == [201] * 20 and set(statuses[20:]) == {429}
    from audit.models import AuditEvent

    assert Agent.objects.filter(registration=Agent.Registration.DYNAMIC).count() == 20
    assert AuditEvent.objects.filter(outcome="refused", error="too_many_requests").count() == 1


def test_metadata_advertises_registration_and_metadata_documents(client: Client, scenario: Scenario) -> None:
    metadata = client.get("/.well-known/oauth-authorization-server").json()
    assert metadata["registration_endpoint"].endswith("/o/register/")
    assert metadata["client_id_metadata_document_supported"] is True
    assert "none" in metadata["token_endpoint_auth_methods_supported"]


def test_production_takes_loopback_redirects_of_native_clients_and_refuses_what_the_deployment_does_not(
    flow: OAuthFlow, client: Client, scenario: Scenario, production: None, settings: Settings
) -> None:
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "ALLOWED_REDIRECT_URI_SCHEMES": ["https"]}
    native = _register(
        client, {"redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "none"}
    )
    assert native.status_code == 201, native.content  # RFC 8252 §7.3, though the deployment is https-only
    flow.login()
    _, challenge = pkce_pair()
    consent = flow.client.get(
        "/o/authorize/?"
        + flow.authorize_query(
            client_id=native.json()["client_id"],
            redirect_uri="http://127.0.0.1:50123/cb",
            scope="catalog:read",
            challenge=challenge,
        )
    )
    assert consent.status_code == 200  # any port on the loopback address
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "ALLOWED_REDIRECT_URI_SCHEMES": ["myapp"]}
    watch = AgentWatch()
    response = _register(
        client, {"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none"}
    )
    _json_error(response, 400, "invalid_redirect_uri")
    watch.assert_one_refusal(error="invalid_redirect_uri", event="registration.refused")
    watch.assert_nothing_changed()


def test_a_public_agent_cannot_use_none_at_ciba_nor_a_confidential_one_anywhere(
    flow: OAuthFlow, client: Client, scenario: Scenario
) -> None:
    from urllib.parse import urlencode

    body = _register(
        client, {"redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "none"}
    ).json()
    watch = AgentWatch()
    ciba = client.post(
        "/o/bc-authorize/",
        urlencode({"client_id": body["client_id"], "scope": "ledger:write"}),
        content_type="application/x-www-form-urlencoded",
    )
    _json_error(ciba, 401, "invalid_client")
    watch.assert_one_refusal(error="invalid_client", event="approval.request_refused")
    watch = AgentWatch()
    token = client.post(
        "/o/token/",
        urlencode(
            {"grant_type": "refresh_token", "refresh_token": "x", "client_id": scenario.agent.client_id}
        ),
        content_type="application/x-www-form-urlencoded",
    )
    _json_error(token, 401, "invalid_client")  # a confidential agent must present its secret
    watch.assert_one_refusal(error="invalid_client", event="token.refused")
    watch.assert_nothing_changed()


def test_a_document_with_private_key_jwt_brings_its_keys_and_authenticates_with_them(
    flow: OAuthFlow, docs: DocumentServer
) -> None:
    from urllib.parse import parse_qs, urlencode, urlparse

    from tests.consent.test_www_authenticate import Key

    key = Key()
    jwks_url = docs.put(
        "/agents/keys.json", {"keys": [key.jwk]}, headers={"Content-Type": "application/jwk-set+json"}
    )
    url = docs.put(
        "/agents/keyed.json",
        _document(
            docs.url("/agents/keyed.json"), token_endpoint_auth_method="private_key_jwt", jwks_uri=jwks_url
        ),
    )
    flow.login()
    verifier, challenge = pkce_pair()
    redirect_uri = "http://127.0.0.1:43117/callback"
    query = flow.authorize_query(
        client_id=url, redirect_uri=redirect_uri, scope="catalog:read", challenge=challenge
    )
    assert flow.client.get("/o/authorize/?" + query).status_code == 200
    agent = Agent.objects.get(client_id=url)
    assert agent.jwks == {"keys": [key.jwk]} and agent.client_type == Agent.CLIENT_CONFIDENTIAL
    code = parse_qs(urlparse(flow.consent(query)["Location"]).query)["code"][0]
    exchange = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
        "client_id": url,
    }
    watch = AgentWatch()
    unsigned = flow.client.post(
        "/o/token/", urlencode(exchange), content_type="application/x-www-form-urlencoded"
    )
    _json_error(unsigned, 401, "invalid_client")  # its keys, not "none"
    watch.assert_one_refusal(error="invalid_client", event="token.refused")
    signed = flow.client.post(
        "/o/token/",
        urlencode(
            {
                **exchange,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": key.assertion(url),
            }
        ),
        content_type="application/x-www-form-urlencoded",
    )
    assert signed.status_code == 200, signed.content


def test_a_jwks_uri_with_a_private_key_is_refused(flow: OAuthFlow, docs: DocumentServer) -> None:
    from tests.consent.test_www_authenticate import Key

    key = Key()
    jwks_url = docs.put("/agents/leaky.json", {"keys": [{**key.jwk, "d": "secret"}]})
    url = docs.put(
        "/agents/doc.json",
        _document(
            docs.url("/agents/doc.json"), token_endpoint_auth_method="private_key_jwt", jwks_uri=jwks_url
        ),
    )
    watch = AgentWatch()
    _assert_error_page(_authorize(flow, url), status=401)
    watch.assert_one_refusal(error="invalid_client", event="client_metadata.refused")
    watch.assert_nothing_changed()

"""The audit endpoints, the registry and registration refuse as every protocol endpoint does: one
renderer (consent.http.error_response), so every body carries ``error``, ``error_description`` and ``reason``."""

import pytest
from django.db import OperationalError
from django.test import Client

from consent.errors import MethodNotAllowed, NotFound, OAuthError, ServiceUnavailable
from tests.conftest import ClientResponse, Scenario, basic

pytestmark = pytest.mark.django_db


def _refusal(response: ClientResponse, status: int, error: str, reason: str) -> dict[str, str]:
    assert response.status_code == status, response.content[:500]
    body: dict[str, str] = response.json()
    assert (body["error"], body["reason"]) == (error, reason)
    assert body["error_description"]
    assert response["Cache-Control"] == "no-store"
    return body


def test_a_missing_checkpoint(client: Client) -> None:
    _refusal(client.get("/audit/checkpoints/7"), 404, "not_found", "not_found")


def test_a_bad_parameter(client: Client) -> None:
    _refusal(client.get("/audit/checkpoints/?limit=0"), 400, "invalid_request", "invalid_request")


def test_a_method_other_than_get_names_the_ones_allowed(client: Client) -> None:
    response = client.post("/audit/checkpoints/")
    _refusal(response, 405, "invalid_request", "invalid_request")
    assert response["Allow"] == "GET, HEAD"


def test_a_reader_without_its_token_is_challenged_as_a_bearer(client: Client) -> None:
    response = client.get("/audit/events/")
    _refusal(response, 401, "invalid_token", "invalid_token")
    assert response["WWW-Authenticate"].startswith('Bearer realm="countersign", error="invalid_token"')


def test_a_resource_server_with_wrong_credentials_is_an_invalid_client_like_anywhere_else(
    client: Client, scenario: Scenario
) -> None:
    response = client.get(
        "/audit/proofs/approval",
        {"approval_id": "00000000-0000-0000-0000-000000000000"},
        HTTP_AUTHORIZATION=basic(scenario.ledger_client_id, "wrong"),
    )
    _refusal(response, 401, "invalid_client", "client_authentication_failed")
    assert response["WWW-Authenticate"].startswith('Basic realm="countersign", error="invalid_client"')


def test_the_registry_does_not_know_an_agent(client: Client, scenario: Scenario) -> None:
    response = client.get(
        "/o/agents/nobody", HTTP_AUTHORIZATION=basic(scenario.ledger_client_id, scenario.ledger_secret)
    )
    _refusal(response, 404, "not_found", "not_found")


def test_registration_answers_post_only(client: Client) -> None:
    response = client.get("/o/register/")
    _refusal(response, 405, "invalid_request", "invalid_request")
    assert response["Allow"] == "POST"


def test_a_database_outage_on_a_protocol_path_is_a_503_with_retry_after(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consent.views import discovery

    def down(*args: object, **kwargs: object) -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(discovery, "jwks", down)
    response = client.get("/.well-known/jwks.json")
    _refusal(response, 503, "temporarily_unavailable", "service_unavailable")
    assert response["Retry-After"] == "5"


def test_the_new_refusals_belong_to_the_one_hierarchy() -> None:
    for cls in (ServiceUnavailable, NotFound, MethodNotAllowed):
        assert issubclass(cls, OAuthError) and cls.__doc__

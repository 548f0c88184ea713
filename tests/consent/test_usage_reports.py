"""/o/usage/: resource servers report the session-token uses they accepted."""

import json
import secrets
import time
from typing import Any

import jwt
import pytest
from django.test import Client

from audit.models import AuditEvent
from consent.models import GrantUse, SessionGrant
from tests.conftest import PASSWORD, ClientResponse, OAuthFlow, Scenario, basic

pytestmark = pytest.mark.django_db


def _use(token: str, **overrides: Any) -> dict[str, Any]:
    claims = jwt.decode(token, options={"verify_signature": False})
    return {
        "id": secrets.token_urlsafe(12),
        "jti": claims["jti"],
        "scope": "catalog:read",
        "operation": "search catalog",
        "outcome": "accepted",
        "at": int(time.time()),
        **overrides,
    }


def _report(
    client: Client, uses: list[dict[str, Any]] | None, *, auth: tuple[str, str], body: str | None = None
) -> ClientResponse:
    return client.post(
        "/o/usage/",
        body if body is not None else json.dumps({"uses": uses}),
        content_type="application/json",
        HTTP_AUTHORIZATION=basic(*auth),
    )


@pytest.fixture
def token(flow: OAuthFlow) -> str:
    body = flow.full()
    flow.client.logout()
    access_token: str = body["access_token"]
    return access_token


def test_a_reported_use_is_stored_against_the_grant_and_audited(
    flow: OAuthFlow, scenario: Scenario, token: str
) -> None:
    catalog = (scenario.rs_client_id, scenario.rs_secret)
    response = _report(flow.client, [_use(token), _use(token, operation="read item 42")], auth=catalog)
    assert response.status_code == 200 and response.json() == {"accepted": 2, "duplicates": 0}
    grant = SessionGrant.objects.get()
    assert sorted(GrantUse.objects.filter(grant=grant).values_list("operation", flat=True)) == [
        "read item 42",
        "search catalog",
    ]
    event = AuditEvent.objects.get(event="grant.used")
    assert event.grant_id == str(grant.pk) and event.actor == f"rs:{scenario.rs_client_id}"
    assert event.detail["uses"] == 2
    flow.client.login(username="officer", password=PASSWORD)
    assert (
        "Catalog reported 2 uses by Procurement Agent: read item 42, search catalog."
        in flow.client.get("/activity/").content.decode()
    )


def test_a_use_of_a_token_not_issued_to_that_resource_server_is_refused(
    flow: OAuthFlow, scenario: Scenario, token: str
) -> None:
    ledger = (scenario.ledger_client_id, scenario.ledger_secret)
    seq = AuditEvent.objects.count()
    for use in (_use(token), _use(token, scope="ledger:write")):  # the token lacks ledger:write, too
        response = _report(flow.client, [use], auth=ledger)
        assert response.status_code == 400 and response.json()["error"] == "invalid_target"
    assert GrantUse.objects.count() == 0
    assert AuditEvent.objects.filter(event="usage.refused").count() == 2 == AuditEvent.objects.count() - seq


def test_a_batch_with_one_forged_use_changes_nothing(flow: OAuthFlow, scenario: Scenario, token: str) -> None:
    catalog = (scenario.rs_client_id, scenario.rs_secret)
    response = _report(flow.client, [_use(token), _use(token, jti="forged-jti")], auth=catalog)
    assert response.status_code == 400 and response.json()["error"] == "invalid_target"
    assert GrantUse.objects.count() == 0


def test_a_replayed_report_counts_once(flow: OAuthFlow, scenario: Scenario, token: str) -> None:
    catalog = (scenario.rs_client_id, scenario.rs_secret)
    use = _use(token)
    assert _report(flow.client, [use], auth=catalog).json() == {"accepted": 1, "duplicates": 0}
    assert _report(flow.client, [use], auth=catalog).json() == {"accepted": 0, "duplicates": 1}
    assert GrantUse.objects.count() == 1 and AuditEvent.objects.filter(event="grant.used").count() == 1


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        json.dumps([]),
        json.dumps({"uses": []}),
        json.dumps({"uses": "x"}),
        json.dumps({"uses": [{"id": "short"}]}),
        "[" * 5000,
        json.dumps({"uses": [{"id": "a" * 12, "jti": "j", "scope": "catalog:read", "at": 0}]}),  # not recent
        json.dumps(
            {
                "uses": [
                    {
                        "id": "a" * 12,
                        "jti": "j",
                        "scope": "catalog:read",
                        "at": time.time(),
                        "operation": "x\n",
                    }
                ]
            }
        ),
        json.dumps(
            {
                "uses": [
                    {"id": f"id-{i:08d}", "jti": "j", "scope": "catalog:read", "at": time.time()}
                    for i in range(101)
                ]
            }
        ),  # a flood in one report
    ],
)
def test_malformed_reports_are_invalid_request_and_audited(
    flow: OAuthFlow, scenario: Scenario, token: str, body: str
) -> None:
    response = _report(flow.client, None, auth=(scenario.rs_client_id, scenario.rs_secret), body=body)
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert GrantUse.objects.count() == 0
    assert AuditEvent.objects.filter(event="usage.refused", error="invalid_request").count() == 1


def test_without_resource_server_credentials_is_invalid_client(
    flow: OAuthFlow, scenario: Scenario, token: str
) -> None:
    response = _report(flow.client, [_use(token)], auth=(scenario.agent.client_id, scenario.agent_secret))
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert GrantUse.objects.count() == 0 and AuditEvent.objects.filter(event="usage.refused").exists()
    assert flow.client.get("/o/usage/").status_code == 405

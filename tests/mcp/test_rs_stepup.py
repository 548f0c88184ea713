"""A resource server opens the step-up for the token it was handed; only it collects the action token."""

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client

from approvals.models import ApprovalRequest
from consent.services import agent_update, scope_set
from consent.tokens import verify
from tests.conftest import ClientResponse, OAuthFlow, Scenario, basic
from tests.consent.test_bad_input import Watch, _json_error

pytestmark = pytest.mark.django_db

CALL = {
    "type": "mcp_tool_call",
    "server": "http://ledger.test",
    "tool": "ledger_append",
    "arguments": {"amount": "1250.00", "currency": "EUR", "vendor": "Acme", "purchase_order": "PO-7"},
}


@pytest.fixture
def mcp_token(flow: OAuthFlow, scenario: Scenario) -> str:
    scope_set(name="ledger:read", values={"audience": "http://ledger.test", "description": "Read the ledger"})
    scope_set(name="ledger:write", values={"authorization_details_types": ["mcp_tool_call"]})
    agent_update(
        agent=scenario.agent, changes={"allowed_scopes": [*scenario.agent.allowed_scopes, "ledger:read"]}
    )
    token: str = flow.full(scope="ledger:read ledger:write")["access_token"]
    flow.client.logout()
    return token


def _post(client: Client, path: str, data: dict[str, str], auth: tuple[str, str]) -> ClientResponse:
    return client.post(
        path,
        urlencode(data),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(*auth),
    )


def _open(
    flow: OAuthFlow,
    token: str,
    *,
    auth: tuple[str, str] | None = None,
    details: Iterable[dict[str, Any]] = (CALL,),
    scope: str = "ledger:write",
) -> ClientResponse:
    auth = auth or (flow.s.ledger_client_id, flow.s.ledger_secret)
    return _post(
        flow.client,
        "/o/rs-approvals/",
        {"token": token, "scope": scope, "authorization_details": json.dumps(list(details))},
        auth,
    )


def test_the_resource_server_opens_and_collects_and_the_agent_cannot(
    flow: OAuthFlow, mcp_token: str, scenario: Scenario
) -> None:
    response = _open(flow, mcp_token)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["approval_uri"].endswith("/approvals/") and body["expires_in"] > 0
    approval = ApprovalRequest.objects.get()
    assert approval.opened_by is not None
    assert approval.opened_by.client_id == scenario.ledger_client_id and approval.agent == scenario.agent
    assert approval.headline.startswith("Run ledger_append: 1250.00 EUR to Acme (PO-7)")
    ledger = (scenario.ledger_client_id, scenario.ledger_secret)
    pending = _post(flow.client, "/o/rs-approvals/token/", {"auth_req_id": body["auth_req_id"]}, ledger)
    _json_error(pending, 400, "authorization_pending")
    ApprovalRequest.objects.filter(pk=approval.pk).update(status=ApprovalRequest.Status.APPROVED)
    # The agent, polling with the auth_req_id, is told it does not exist.
    agent_poll = flow.token(
        {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": body["auth_req_id"]}
    )
    _json_error(agent_poll, 400, "invalid_grant", reason="unknown_auth_req_id")
    # Another resource server cannot collect it either.
    other = _post(
        flow.client,
        "/o/rs-approvals/token/",
        {"auth_req_id": body["auth_req_id"]},
        (scenario.rs_client_id, scenario.rs_secret),
    )
    _json_error(other, 400, "invalid_grant", reason="unknown_auth_req_id")
    collected = _post(flow.client, "/o/rs-approvals/token/", {"auth_req_id": body["auth_req_id"]}, ledger)
    assert collected.status_code == 200, collected.content
    claims = verify(collected.json()["access_token"], typ="action+jwt", audience="http://ledger.test")
    assert claims["authorization_details"] == [CALL] and "cnf" not in claims


@pytest.mark.parametrize(
    "case,error",
    [
        ("token_for_another_server", "invalid_token"),
        ("scope_of_another_server", "invalid_scope"),
        ("wrong_type", "invalid_authorization_details"),
        ("junk_token", "invalid_token"),
        ("bad_credentials", "invalid_client"),
    ],
)
def test_bad_openings_are_refused_and_create_nothing(
    flow: OAuthFlow, mcp_token: str, scenario: Scenario, case: str, error: str
) -> None:
    watch = Watch()
    if case == "token_for_another_server":  # the catalog server presents a token for the ledger
        response = _open(
            flow, mcp_token, auth=(scenario.rs_client_id, scenario.rs_secret), scope="catalog:read"
        )
    elif case == "scope_of_another_server":
        scope_set(
            name="catalog:write",
            values={
                "audience": "http://catalog.test",
                "sensitivity": "step_up",
                "authorization_details_types": ["mcp_tool_call"],
            },
        )
        response = _open(flow, mcp_token, scope="catalog:write")
    elif case == "wrong_type":
        response = _open(flow, mcp_token, details=[{**CALL, "type": "ledger_entry"}])
    elif case == "junk_token":
        response = _open(flow, "x.y.z")
    else:
        response = _open(flow, mcp_token, auth=(scenario.ledger_client_id, "wrong"))
    _json_error(response, 401 if error == "invalid_client" else response.status_code, error)
    watch.assert_one_refusal(error=error)
    watch.assert_nothing_changed()
    assert not ApprovalRequest.objects.exists()

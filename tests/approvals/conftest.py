import json
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client
from pytest_django import Settings

from approvals.models import ApprovalRequest
from approvals.services import auth_req_id_hash
from consent.models import ScopePolicy
from tests.conftest import PASSWORD, ClientResponse, OAuthFlow, Scenario, basic

LEDGER_ENTRY = {
    "type": "ledger_entry",
    "actions": ["append"],
    "purchase_order": "PO-2026-0142",
    "vendor": "Acme Office Supply",
    "amount": "4250.00",
    "currency": "USD",
}


class Agent:
    """The agent's side of CIBA, through the test client."""

    def __init__(self, flow: OAuthFlow, scenario: Scenario) -> None:
        self.flow, self.s = flow, scenario
        self.session_token = ""  # start_session() signs in and sets it

    def start_session(self) -> str:
        self.session_token = str(self.flow.full()["access_token"])
        self.flow.client.logout()
        return self.session_token

    def ask(
        self,
        details: dict[str, Any] | None = None,
        *,
        scope: str = "ledger:write",
        auth: tuple[str, str] | None = None,
        **extra: str,
    ) -> ClientResponse:
        data = {
            "scope": scope,
            "login_hint_token": self.session_token,
            "authorization_details": json.dumps([details or LEDGER_ENTRY]),
        }
        data.update(extra)
        client_id, secret = auth or (self.s.agent.client_id, self.s.agent_secret)
        return self.flow.client.post(
            "/o/bc-authorize/",
            urlencode(data),
            content_type="application/x-www-form-urlencoded",
            HTTP_AUTHORIZATION=basic(client_id, secret),
        )

    def poll(self, auth_req_id: str, *, auth: tuple[str, str] | None = None) -> ClientResponse:
        return self.flow.token(
            {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": auth_req_id}, auth=auth
        )

    def approved_token(self, client: Client) -> str:
        """Ask for the ledger write, have the officer approve it in the inbox (signed in on ``client``),
        and collect the action token."""
        auth_req_id = self.ask().json()["auth_req_id"]
        client.login(username="officer", password=PASSWORD)
        approval = ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(auth_req_id))
        client.post(f"/approvals/{approval.pk}/approve/")
        return str(self.poll(auth_req_id).json()["access_token"])

    def redeem(self, token: str, *, auth: tuple[str, str] | None = None, **extra: str) -> ClientResponse:
        client_id, secret = auth or (self.s.ledger_client_id, self.s.ledger_secret)
        return self.flow.client.post(
            "/o/redeem/",
            urlencode({"token": token, **extra}),
            content_type="application/x-www-form-urlencoded",
            HTTP_AUTHORIZATION=basic(client_id, secret),
        )


@pytest.fixture
def agent(flow: OAuthFlow, scenario: Scenario, ledger_policy: ScopePolicy, settings: Settings) -> Agent:
    settings.CELERY_TASK_ALWAYS_EAGER = False
    a = Agent(flow, scenario)
    a.start_session()
    return a

"""Step-up by agent instances: the approval records which instance asked, only it collects, its
action token names it, and once it is cut off its requests, collects and redemptions are refused
while the grant and the agent's other instances keep working."""

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from django.test import Client

from approvals.models import ApprovalRequest
from approvals.services import auth_req_id_hash
from audit.models import AuditEvent
from consent.instances import agent_instance_cut_off
from consent.models import AgentInstance, SessionGrant
from countersign.instance import AgentInstance as SdkInstance
from tests.approvals.conftest import LEDGER_ENTRY, Agent
from tests.conftest import PASSWORD, ClientResponse, OAuthFlow, Scenario
from tests.consent.test_instances import agent_key, headers, instance, join  # noqa: F401  (fixture)
from tests.consent.test_token_exchange import AgentKey

CIBA = "urn:openid:params:grant-type:ciba"


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


class Instance:
    """One instance of the scenario's agent, through the test client."""

    def __init__(self, client: Client, sdk: SdkInstance, session_token: str) -> None:
        self.client, self.sdk, self.session_token = client, sdk, session_token

    def ask(self, amount: str = "4250.00") -> ClientResponse:
        environ: dict[str, Any] = headers(self.sdk, pop=self.sdk.pop("http://127.0.0.1:8000"))
        data = {
            "scope": "ledger:write",
            "login_hint_token": self.session_token,
            "authorization_details": json.dumps([{**LEDGER_ENTRY, "amount": amount}]),
        }
        return self.client.post(
            "/o/bc-authorize/",
            urlencode(data),
            content_type="application/x-www-form-urlencoded",
            **environ,
        )

    def poll(self, auth_req_id: str) -> ClientResponse:
        environ: dict[str, Any] = headers(self.sdk)
        return self.client.post(
            "/o/token/",
            urlencode({"grant_type": CIBA, "auth_req_id": auth_req_id}),
            content_type="application/x-www-form-urlencoded",
            **environ,
        )


def approve(client: Client, auth_req_id: str) -> ApprovalRequest:
    client.login(username="officer", password=PASSWORD)
    approval = ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(auth_req_id))
    assert client.post(f"/approvals/{approval.pk}/approve/").status_code in (200, 302)
    client.logout()
    return approval


@pytest.fixture
def pair(client: Client, agent: Agent, scenario: Scenario, agent_key: AgentKey) -> list[Instance]:  # noqa: F811
    """Two instances joined to the agent's grant, each with its own session token."""
    made = []
    for name in ("3f9c2a7b", "b81d04e6"):
        sdk = instance(scenario, agent_key, name)
        response = join(client, sdk, agent.session_token)
        assert response.status_code == 200, response.content
        made.append(Instance(client, sdk, response.json()["access_token"]))
    return made


def test_the_approval_records_the_instance_and_only_it_collects(
    client: Client, agent: Agent, pair: list[Instance]
) -> None:
    a, b = pair
    asked = a.ask()
    assert asked.status_code == 200, asked.content
    auth_req_id = asked.json()["auth_req_id"]
    approval = approve(client, auth_req_id)
    assert approval.instance == "3f9c2a7b"
    requested = AuditEvent.objects.get(event="approval.requested")
    assert requested.detail["instance"] == "3f9c2a7b"

    other = b.poll(auth_req_id)
    assert other.status_code == 400 and other.json()["reason"] == "instance_mismatch"
    plain = agent.poll(auth_req_id)  # the agent as one (client secret) is not that instance either
    assert plain.status_code == 400 and plain.json()["reason"] == "instance_mismatch"

    collected = a.poll(auth_req_id)
    assert collected.status_code == 200, collected.content
    token = collected.json()["access_token"]
    assert claims(token)["act"]["instance"] == "3f9c2a7b"
    assert AuditEvent.objects.get(event="action_token.issued").detail["instance"] == "3f9c2a7b"
    redeemed = agent.redeem(token)
    assert redeemed.status_code == 200 and redeemed.json()["act"]["instance"] == "3f9c2a7b"


def test_another_instances_session_token_is_not_a_login_hint(client: Client, pair: list[Instance]) -> None:
    a, b = pair
    a.session_token, b.session_token = b.session_token, a.session_token
    refused = a.ask()
    assert refused.status_code == 400 and refused.json()["reason"] == "instance_mismatch"
    assert not ApprovalRequest.objects.exists()


def test_a_cut_off_instance_is_refused_everywhere_and_the_other_keeps_working(
    client: Client, agent: Agent, scenario: Scenario, pair: list[Instance], flow: OAuthFlow
) -> None:
    a, b = pair
    first = a.ask("100.00").json()["auth_req_id"]
    approve(client, first)
    action_token = a.poll(first).json()["access_token"]
    second = a.ask("200.00").json()["auth_req_id"]
    approve(client, second)

    row = AgentInstance.objects.get(instance_id="3f9c2a7b")
    agent_instance_cut_off(instance_pk=row.pk, by=f"user:{scenario.user.pk}", user_id=scenario.user.pk)
    # Its open requests end with it (audited, gone from the inbox); what it collected is refused below.
    assert set(ApprovalRequest.objects.values_list("status", flat=True)) == {"cancelled"}
    assert (
        AuditEvent.objects.filter(event="approval.cancelled", detail__reason="instance_cut_off").count() == 2
    )
    before = ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(second)).status

    def refused_once(send: Callable[[], ClientResponse], error: str, status: int, event: str) -> None:
        audited = AuditEvent.objects.filter(outcome="refused").count()
        response = send()
        assert response.status_code == status, response.content
        assert response.json()["error"] == error and response.json()["reason"] == "instance_cut_off"
        assert AuditEvent.objects.filter(outcome="refused").count() == audited + 1  # one row, of its own kind
        assert AuditEvent.objects.filter(outcome="refused").latest("id").event == event

    refused_once(lambda: a.ask("300.00"), "invalid_client", 401, "agent_instance.refused")
    refused_once(lambda: a.poll(second), "invalid_client", 401, "agent_instance.refused")
    assert ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(second)).status == before
    refused_once(lambda: agent.redeem(action_token), "invalid_token", 400, "redemption.refused")
    assert AuditEvent.objects.filter(event="agent_instance.refused").count() == 2
    ledger = (scenario.ledger_client_id, scenario.ledger_secret)
    assert flow.introspect(action_token, auth=ledger).json() == {"active": False}
    assert flow.introspect(a.session_token).json() == {"active": False}

    # The grant and the other instance: untouched.
    assert SessionGrant.objects.get().status == "active"
    assert flow.introspect(b.session_token).json()["active"] is True
    theirs = b.ask("400.00").json()["auth_req_id"]
    approve(client, theirs)
    token_b = b.poll(theirs).json()["access_token"]
    assert agent.redeem(token_b).status_code == 200
    sentences = [e.event for e in AuditEvent.objects.filter(event="agent_instance.cut_off")]
    assert sentences == ["agent_instance.cut_off"]


def test_the_inbox_and_activity_name_the_instance(client: Client, agent: Agent, pair: list[Instance]) -> None:
    a, _ = pair
    approval = approve(client, a.ask().json()["auth_req_id"])
    client.login(username="officer", password=PASSWORD)
    ApprovalRequest.objects.filter(pk=approval.pk).update(status="pending")
    inbox = client.get("/approvals/").content.decode()
    assert "Instance <code" in inbox and "3f9c…" in inbox
    activity = client.get("/activity/").content.decode()
    assert "Procurement Agent (instance 3f9c…) asked for your approval" in activity
    assert "Procurement Agent (instance 3f9c…) started acting on this connection." in activity

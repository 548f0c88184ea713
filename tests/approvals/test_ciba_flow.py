"""The step-up flow through HTTP: request, decision, collection, redemption."""

import jwt
import pytest
from django.test import Client

from approvals.models import ActionToken, ApprovalRequest
from approvals.rar import action_hash
from audit.models import AuditEvent
from tests.approvals.conftest import LEDGER_ENTRY, Agent
from tests.conftest import PASSWORD, ClientResponse, Scenario

pytestmark = pytest.mark.django_db


def _approve(client: Client, approval_id: object, decision: str = "approve") -> ClientResponse:
    client.login(username="officer", password=PASSWORD)
    return client.post(f"/approvals/{approval_id}/{decision}/")


def test_request_approve_collect_redeem_once(agent: Agent, client: Client, scenario: Scenario) -> None:
    response = agent.ask(binding_message="Step 5 of 5")
    assert response.status_code == 200, response.content
    body = response.json()
    assert len(body["auth_req_id"]) >= 32 and body["expires_in"] <= 600 and body["interval"] == 5
    approval = ApprovalRequest.objects.get()
    assert approval.headline.startswith("Append 4250.00 USD to Acme Office Supply (PO-2026-0142)")
    assert approval.auth_req_id_hash != body["auth_req_id"]

    pending = agent.poll(body["auth_req_id"])
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending"
    assert agent.poll(body["auth_req_id"]).json()["error"] == "slow_down"

    inbox = (client.login(username="officer", password=PASSWORD), client.get("/approvals/"))[1]
    assert b"Append 4250.00 USD" in inbox.content and b"Step 5 of 5" in inbox.content
    assert _approve(client, approval.pk).status_code == 302

    token_response = agent.poll(body["auth_req_id"])
    assert token_response.status_code == 200, token_response.content
    token = token_response.json()["access_token"]
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["typ"] == "action+jwt"
    assert claims["scope"] == "ledger:write" and claims["aud"] == "http://ledger.test"
    assert claims["authorization_details"] == [LEDGER_ENTRY]
    assert claims["action_hash"] == action_hash([LEDGER_ENTRY])
    assert claims["act"] == {"sub": f"agent:{scenario.agent.client_id}"}
    assert claims["approval_id"] == str(approval.pk) and claims["exp"] - claims["iat"] == 120
    assert agent.poll(body["auth_req_id"]).json()["error"] == "invalid_grant"  # single use

    first = agent.redeem(token, action_hash=action_hash([LEDGER_ENTRY]))
    assert first.status_code == 200 and first.json()["authorization_details"] == [LEDGER_ENTRY]
    second = agent.redeem(token)
    assert second.status_code == 400 and second.json()["reason"] == "already_redeemed"
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.REDEEMED
    events = set(AuditEvent.objects.values_list("event", flat=True))
    assert {
        "approval.requested",
        "approval.approved",
        "action_token.issued",
        "action_token.redeemed",
        "redemption.refused",
    } <= events


def test_deny_gives_access_denied(agent: Agent, client: Client) -> None:
    body = agent.ask().json()
    _approve(client, ApprovalRequest.objects.get().pk, "deny")
    response = agent.poll(body["auth_req_id"])
    assert response.status_code == 400 and response.json()["error"] == "access_denied"
    assert ActionToken.objects.count() == 0


def test_session_token_is_refused_at_redemption_and_action_token_as_session_token(
    agent: Agent, client: Client
) -> None:
    refused = agent.redeem(agent.session_token)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_token"
    body = agent.ask().json()
    _approve(client, ApprovalRequest.objects.get().pk)
    token = agent.poll(body["auth_req_id"]).json()["access_token"]
    client.logout()
    assert agent.flow.introspect(token).json() == {"active": False}


def test_changed_action_is_refused_at_redemption(agent: Agent, client: Client) -> None:
    body = agent.ask().json()
    _approve(client, ApprovalRequest.objects.get().pk)
    token = agent.poll(body["auth_req_id"]).json()["access_token"]
    tampered = action_hash([{**LEDGER_ENTRY, "amount": "9250.00"}])
    response = agent.redeem(token, action_hash=tampered)
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert ActionToken.objects.get().redeemed_at is None

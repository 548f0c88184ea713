"""Extending a session grant goes through the user, via the same CIBA prompts."""

import json
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.models import SessionGrant
from tests.approvals.conftest import Agent
from tests.conftest import PASSWORD, ClientResponse

pytestmark = pytest.mark.django_db

EXTENSION = {"type": "grant_extension", "seconds": 4 * 3600}


def _ask_extension(agent: Agent, details: dict[str, Any] | None = None) -> ClientResponse:
    return agent.ask(details or EXTENSION, scope="grant:extend", binding_message="The run needs 4 more hours")


def test_approved_extension_moves_the_grant_end(agent: Agent, client: Client) -> None:
    grant = SessionGrant.objects.get()
    before = grant.expires_at
    body = _ask_extension(agent).json()
    approval = ApprovalRequest.objects.get()
    assert "connection with this agent" in approval.headline
    client.login(username="officer", password=PASSWORD)
    assert client.post(f"/approvals/{approval.pk}/approve/").status_code == 302
    grant.refresh_from_db()
    assert grant.expires_at > before
    assert abs((grant.expires_at - timezone.now()).total_seconds() - 4 * 3600) < 60
    token = agent.poll(body["auth_req_id"]).json()
    assert token["scope"] == "grant:extend" and token["grant_expires_at"] == int(grant.expires_at.timestamp())
    assert AuditEvent.objects.filter(event="grant.extended").count() == 1


def test_denied_or_expired_extension_changes_nothing(agent: Agent, client: Client) -> None:
    grant = SessionGrant.objects.get()
    before = grant.expires_at
    body = _ask_extension(agent).json()
    client.login(username="officer", password=PASSWORD)
    client.post(f"/approvals/{ApprovalRequest.objects.get().pk}/deny/")
    assert agent.poll(body["auth_req_id"]).json()["error"] == "access_denied"
    second = _ask_extension(agent, {"type": "grant_extension", "seconds": 7200}).json()
    ApprovalRequest.objects.filter(status="pending").update(expires_at=timezone.now())
    assert agent.poll(second["auth_req_id"]).json()["error"] == "expired_token"
    grant.refresh_from_db()
    assert grant.expires_at == before
    assert not AuditEvent.objects.filter(event="grant.extended").exists()


@pytest.mark.parametrize(
    "details",
    [
        {"type": "grant_extension", "seconds": 10**9},
        {"type": "grant_extension", "seconds": "3600"},
        {"type": "grant_extension"},
        {"type": "ledger_entry", "amount": "1.00"},
    ],
)
def test_extension_requests_outside_the_rules_are_refused(agent: Agent, details: dict[str, Any]) -> None:
    response = agent.ask(details, scope="grant:extend")
    assert response.status_code == 400 and response.json()["error"] == "invalid_authorization_details"
    assert ApprovalRequest.objects.count() == 0
    assert json.loads(response.content)["error_description"]

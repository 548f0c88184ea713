"""RFC 7662 introspection of action tokens: active to their own resource server until spent."""

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from approvals.models import ActionToken, ApprovalRequest
from audit.models import AuditEvent
from consent.models import Agent
from consent.services import agent_update, grant_revoke
from tests.approvals.conftest import Agent as CibaAgent
from tests.conftest import Scenario

pytestmark = pytest.mark.django_db


@pytest.fixture
def action_token(agent: CibaAgent, client: Client) -> str:
    token = agent.approved_token(client)
    client.logout()
    return token


def _as_ledger(agent: CibaAgent, token: str) -> dict[str, Any]:
    body: dict[str, Any] = agent.flow.introspect(
        token, auth=(agent.s.ledger_client_id, agent.s.ledger_secret)
    ).json()
    return body


def test_unredeemed_token_is_active_to_its_audience_with_what_was_approved(
    agent: CibaAgent, action_token: str
) -> None:
    body = _as_ledger(agent, action_token)
    approval = ApprovalRequest.objects.get()
    assert body["active"] is True
    assert body["aud"] == "http://ledger.test" and body["scope"] == "ledger:write"
    assert body["authorization_details"] == approval.authorization_details
    assert body["action_hash"] == approval.action_hash
    assert body["approval_id"] == str(approval.pk)


def test_another_resource_server_learns_nothing(agent: CibaAgent, action_token: str) -> None:
    assert agent.flow.introspect(action_token).json() == {"active": False}
    assert AuditEvent.objects.filter(event="introspection.inactive").exists()


def test_redeemed_token_is_inactive(agent: CibaAgent, action_token: str) -> None:
    assert agent.redeem(action_token).status_code == 200
    assert _as_ledger(agent, action_token) == {"active": False}


def test_expired_token_is_inactive(agent: CibaAgent, action_token: str) -> None:
    ActionToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert _as_ledger(agent, action_token) == {"active": False}


def test_revoked_grant_makes_it_inactive(agent: CibaAgent, action_token: str) -> None:
    grant_revoke(grant_id=ApprovalRequest.objects.get().grant_id, reason="test", actor="user:test")
    assert _as_ledger(agent, action_token) == {"active": False}


def test_suspended_agent_makes_it_inactive(agent: CibaAgent, action_token: str, scenario: Scenario) -> None:
    agent_update(agent=scenario.agent, changes={"status": Agent.Status.SUSPENDED})
    assert _as_ledger(agent, action_token) == {"active": False}


def test_tampered_token_is_inactive(agent: CibaAgent, action_token: str) -> None:
    head, body, sig = action_token.split(".")
    assert _as_ledger(agent, f"{head}.{body}x.{sig}") == {"active": False}

"""Approval fatigue over time (CIBA Core §7.1 ``requested_expiry``, the prompt caps) and prompts
that end with their grant. Through the backchannel endpoint over the test client; the grant's
end as it happens in a real server and worker is in ``test_grant_end_live``."""

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from pytest_django import Settings

from approvals.models import ApprovalRequest
from approvals.services import approval_expire, auth_req_id_hash
from audit.models import AuditEvent
from consent.models import ScopePolicy, SessionGrant
from tests.approvals.conftest import Agent
from tests.approvals.support import ledger_entry
from tests.conftest import ClientResponse, Scenario

S = ApprovalRequest.Status


def _ask(agent: Agent, amount: str, **extra: Any) -> ClientResponse:
    return agent.ask(ledger_entry(amount), **extra)


def _end_windows() -> None:
    """What time does to short prompts: every pending one has ended."""
    ApprovalRequest.objects.filter(status=S.PENDING).update(status=S.EXPIRED, decision_method="timeout")


def test_requested_expiry_has_a_floor(agent: Agent) -> None:
    response = _ask(agent, "1.00", requested_expiry="5")
    assert response.status_code == 200
    assert 55 <= response.json()["expires_in"] <= 60
    approval = ApprovalRequest.objects.get()
    assert (approval.expires_at - approval.created).total_seconds() == pytest.approx(60, abs=1)


def test_short_lived_prompts_cannot_slip_past_the_cap(agent: Agent, settings: Settings) -> None:
    """The attack from the sweep: rounds of requests with a tiny requested_expiry."""
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "MAX_PROMPTS_PER_USER_IN_WINDOW": 10}
    answers = []
    for round_ in range(3):
        answers.append(
            [_ask(agent, f"{round_}.{i:02d}", requested_expiry="5").status_code for i in range(10)]
        )
        _end_windows()
    assert answers[0] == [200] * 10
    assert answers[1] == answers[2] == [429] * 10
    assert ApprovalRequest.objects.count() == 10
    refused = AuditEvent.objects.filter(event="approval.request_refused", error="temporarily_unavailable")
    assert refused.count() == 20
    first = refused.first()
    assert first is not None and "asked too often recently" in first.detail["reason"]
    # The window slides: prompts created before it no longer count.
    ApprovalRequest.objects.update(created=timezone.now() - timedelta(seconds=601))
    assert _ask(agent, "9.99").status_code == 200


def test_collapsed_duplicates_stay_collapsed_and_count_once(agent: Agent, settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "MAX_PROMPTS_PER_USER_IN_WINDOW": 2}
    first = [_ask(agent, "1.00").json()["auth_req_id"] for _ in range(5)]
    assert len(set(first)) == 1
    assert _ask(agent, "2.00").status_code == 200
    # At the cap, the same action still gets its one prompt back, and a new one is refused.
    assert _ask(agent, "1.00").json()["auth_req_id"] == first[0]
    assert _ask(agent, "3.00").status_code == 429
    assert ApprovalRequest.objects.count() == 2


def test_auto_approved_requests_do_not_count(
    agent: Agent, settings: Settings, ledger_policy: ScopePolicy
) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "MAX_PROMPTS_PER_USER_IN_WINDOW": 1}
    ledger_policy.auto_approve_rule = "amount <= 10"
    ledger_policy.save()
    assert [_ask(agent, f"{i}.00").status_code for i in range(1, 4)] == [200] * 3
    assert _ask(agent, "500.00").status_code == 200
    assert _ask(agent, "600.00").status_code == 429


def test_a_prompt_never_outlives_its_grant(agent: Agent, scenario: Scenario) -> None:
    grant = SessionGrant.objects.get(user=scenario.user)
    SessionGrant.objects.filter(pk=grant.pk).update(expires_at=timezone.now() + timedelta(seconds=30))
    response = _ask(agent, "1.00")
    assert response.status_code == 200 and response.json()["expires_in"] <= 30
    approval = ApprovalRequest.objects.get()
    grant.refresh_from_db()
    assert approval.expires_at == grant.expires_at


def test_a_poll_after_the_grant_ended_cancels_the_prompt(agent: Agent, scenario: Scenario) -> None:
    auth_req_id = _ask(agent, "1.00").json()["auth_req_id"]
    SessionGrant.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = agent.poll(auth_req_id)
    assert response.status_code == 400 and response.json()["error"] == "access_denied"
    approval = ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(auth_req_id))
    assert approval.status == S.CANCELLED and approval.decision_method == "grant_ended"
    assert AuditEvent.objects.filter(event="approval.cancelled", detail__reason="grant_ended").count() == 1


def test_the_on_time_expiry_at_the_grant_end_cancels(agent: Agent, scenario: Scenario) -> None:
    _ask(agent, "1.00")
    approval = ApprovalRequest.objects.get()
    past = timezone.now() - timedelta(seconds=1)
    SessionGrant.objects.update(expires_at=past)
    ApprovalRequest.objects.update(expires_at=past)  # capped at the grant's end, which has come
    assert approval_expire(approval_id=approval.pk)
    approval.refresh_from_db()
    assert approval.status == S.CANCELLED and approval.decision_method == "grant_ended"
    assert not AuditEvent.objects.filter(event="approval.expired").exists()

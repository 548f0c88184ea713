"""Budgets on the request path: inside the user's budget a step-up request is approved without a
prompt (through the approve edge, audited as a budget approval, the amount reserved); outside it
the user is asked, and the prompt says why. Amounts that end unredeemed go back, once.
"""

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from pytest_django import Settings

from approvals.activity import describe
from approvals.delivery import prompt_payload
from approvals.models import ActionToken, ApprovalRequest, BudgetReservation
from approvals.selectors import approval_for_push
from approvals.services import approval_expire, approvals_expire_due, auth_req_id_hash
from audit.models import AuditEvent
from consent.budget import Budget, period_start
from consent.budgets import BudgetChoice, budget_end, budget_lower, budgets_create
from consent.models import ScopePolicy, SessionGrant
from consent.services import grant_revoke, scope_set
from tests.approvals.conftest import Agent
from tests.approvals.support import ledger_entry
from tests.conftest import PASSWORD, Scenario

pytestmark = pytest.mark.django_db

S = ApprovalRequest.Status
R = BudgetReservation.State


@pytest.fixture
def budget_policy(ledger_policy: ScopePolicy) -> ScopePolicy:
    policy, _ = scope_set(
        name="ledger:write",
        values={
            "budget_currency": "USD",
            "budget_max_per_action": Decimal("1000.00"),
            "budget_max_total": Decimal("5000.00"),
            "budget_periods": ["day", "week", "month"],
        },
    )
    return policy


@pytest.fixture
def budget(agent: Agent, budget_policy: ScopePolicy, scenario: Scenario) -> Budget:
    """The officer's grant with "up to 500.00 USD each, 2,000.00 USD a week" on the ledger."""
    grant = SessionGrant.objects.get()
    (created,) = budgets_create(
        grant=grant,
        choices=[BudgetChoice("ledger:write", "500.00", "2000.00", "week", "USD")],
        actor=f"user:{scenario.user.pk}",
    )
    return created


_po = iter(range(10_000))


def ask(agent: Agent, amount: str = "120.00", **extra: Any) -> tuple[str, ApprovalRequest]:
    """One ledger write of ``amount`` (a fresh purchase order each time, so nothing collapses)."""
    response = agent.ask(ledger_entry(amount, purchase_order=f"PO-{next(_po)}", **extra))
    assert response.status_code == 200, response.content
    auth_req_id = response.json()["auth_req_id"]
    return auth_req_id, ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(auth_req_id))


def used(budget: Budget) -> Decimal:
    return Budget.objects.get(pk=budget.pk).used


def test_inside_the_budget_no_prompt_token_minted_and_audited(
    agent: Agent, budget: Budget, scenario: Scenario, client: Client
) -> None:
    auth_req_id, approval = ask(agent, "120.00")
    assert approval.status == S.APPROVED and approval.decision_method == "budget"
    assert approval.decided_by_id is None and approval.delivered_at is None  # nobody was asked
    assert used(budget) == Decimal("120.00")
    reservation = BudgetReservation.objects.get(approval=approval)
    assert (reservation.amount, reservation.currency, reservation.state) == (
        Decimal("120.00"),
        "USD",
        R.RESERVED,
    )
    events = list(AuditEvent.objects.filter(detail__approval_id=str(approval.pk)).order_by("id"))
    assert [e.event for e in events] == ["approval.requested", "approval.budget_approved"]
    assert events[1].detail["amount"] == "120.00" and events[1].detail["currency"] == "USD"
    sentences = [e.sentence for e in describe(events, user_id=scenario.user.pk)]
    assert "approved within your budget" in sentences[1]

    collected = agent.poll(auth_req_id)
    assert collected.status_code == 200, collected.content
    redeemed = agent.redeem(collected.json()["access_token"])
    assert redeemed.status_code == 200, redeemed.content
    assert BudgetReservation.objects.get(approval=approval).state == R.SPENT
    assert used(budget) == Decimal("120.00")  # spent stays counted

    # /grants/ tells what is left; the timeline says it was approved within the budget.
    client.login(username="officer", password=PASSWORD)
    page = client.get("/grants/").content.decode()
    assert "1,880.00 USD left of 2,000.00 USD this week" in page
    detail = client.get(f"/grants/{approval.grant_id}/").content.decode()
    assert "approved within your budget" in detail
    assert "Approved within your budget (120.00 USD)" in client.get("/approvals/").content.decode()


def test_over_the_per_action_ceiling_prompts_and_says_why(
    agent: Agent, budget: Budget, client: Client
) -> None:
    auth_req_id, approval = ask(agent, "600.00")
    assert approval.status == S.PENDING
    assert approval.budget_note == "over your 500.00 USD per-purchase budget"
    assert used(budget) == 0 and not BudgetReservation.objects.exists()
    assert agent.poll(auth_req_id).json()["error"] == "authorization_pending"
    requested = AuditEvent.objects.get(event="approval.requested", detail__approval_id=str(approval.pk))
    assert requested.detail["budget"] == approval.budget_note
    # The prompt says why it asks, on the page and in what the live inbox is pushed.
    client.login(username="officer", password=PASSWORD)
    inbox = client.get("/approvals/").content.decode()
    assert "Not within your budget:" in inbox and "over your 500.00 USD per-purchase budget" in inbox
    pushed = approval_for_push(approval_id=approval.pk)
    assert pushed is not None and prompt_payload(pushed)["budget_note"] == approval.budget_note


def test_over_the_period_total_prompts(agent: Agent, budget: Budget) -> None:
    for _ in range(4):
        assert ask(agent, "500.00")[1].status == S.APPROVED
    assert used(budget) == Decimal("2000.00")
    _, approval = ask(agent, "0.01")
    assert approval.status == S.PENDING
    assert approval.budget_note == "over what is left of your 2,000.00 USD weekly budget (0.00 USD left)"
    assert used(budget) == Decimal("2000.00")


@pytest.mark.parametrize(
    ("details", "why"),
    [
        ({"currency": "EUR"}, "it is in EUR; your budget is in USD"),
        (
            {"amount": 120},
            "it carries no amount your budget can count",
        ),  # a JSON number, not a decimal string
        ({"amount": "-5.00"}, "it carries no amount your budget can count"),
        ({"amount": "1e2"}, "it carries no amount your budget can count"),
    ],
)
def test_wrong_currency_or_no_countable_amount_prompts(
    agent: Agent, budget: Budget, details: dict[str, Any], why: str
) -> None:
    entry = ledger_entry("120.00", purchase_order="PO-odd")
    entry.update(details)
    response = agent.ask(entry)
    assert response.status_code == 200, response.content
    approval = ApprovalRequest.objects.get()
    assert approval.status == S.PENDING and approval.budget_note == why
    assert used(budget) == 0


def test_expired_unredeemed_token_returns_the_amount_once(
    agent: Agent, budget: Budget, settings: Settings
) -> None:
    auth_req_id, approval = ask(agent, "300.00")
    assert agent.poll(auth_req_id).status_code == 200
    assert used(budget) == Decimal("300.00")
    ActionToken.objects.filter(approval=approval).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert approval_expire(approval_id=approval.pk) is True
    assert approval_expire(approval_id=approval.pk) is False  # the expiry task, delivered twice
    assert approvals_expire_due() == 0  # and the sweep after it
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.EXPIRED
    assert used(budget) == 0
    assert BudgetReservation.objects.get(approval=approval).state == R.REFUNDED
    refunds = AuditEvent.objects.filter(event="budget.refunded", detail__approval_id=str(approval.pk))
    assert refunds.count() == 1 and refunds.get().detail["amount"] == "300.00"


def test_revoking_the_grant_returns_what_was_reserved(
    agent: Agent, budget: Budget, scenario: Scenario
) -> None:
    _, approval = ask(agent, "250.00")
    assert used(budget) == Decimal("250.00")
    grant_revoke(
        grant_id=approval.grant_id,
        reason="revoked_by_user",
        actor=f"user:{scenario.user.pk}",
        user=scenario.user,
    )
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.CANCELLED
    assert used(budget) == 0
    assert BudgetReservation.objects.get(approval=approval).state == R.REFUNDED


def test_lowering_while_a_request_is_pending(
    agent: Agent, budget: Budget, scenario: Scenario, client: Client
) -> None:
    # A prompt over the ceiling waits; a budget approval holds 400.00.
    _, prompt = ask(agent, "600.00")
    held_id, held = ask(agent, "400.00")
    assert (prompt.status, held.status) == (S.PENDING, S.APPROVED)
    budget_lower(budget_id=budget.pk, user_id=scenario.user.pk, per_action="300.00", total="300.00")
    # Below what is used: the reservation stands (its token is still collected and redeemed) ...
    token = agent.poll(held_id).json()["access_token"]
    assert agent.redeem(token).status_code == 200
    assert used(budget) == Decimal("400.00")
    # ... new requests do not fit, even small ones ...
    _, small = ask(agent, "10.00")
    assert small.status == S.PENDING and "left of your 300.00 USD weekly budget" in small.budget_note
    # ... and the user still decides the waiting prompt.
    client.login(username="officer", password=PASSWORD)
    assert client.post(f"/approvals/{prompt.pk}/approve/").status_code == 302
    assert ApprovalRequest.objects.get(pk=prompt.pk).status == S.APPROVED
    assert used(budget) == Decimal("400.00")


def test_ending_the_budget_makes_every_request_ask(agent: Agent, budget: Budget, scenario: Scenario) -> None:
    budget_end(budget_id=budget.pk, user_id=scenario.user.pk)
    _, approval = ask(agent, "10.00")
    assert approval.status == S.PENDING and approval.budget_note == ""
    assert Budget.objects.get(pk=budget.pk).status == Budget.Status.ENDED


def test_period_rollover_starts_from_nothing_and_old_refunds_stay_in_their_period(
    agent: Agent, budget: Budget
) -> None:
    first_id, first = ask(agent, "500.00")
    for _ in range(3):
        ask(agent, "500.00")
    assert used(budget) == Decimal("2000.00")
    assert ask(agent, "10.00")[1].status == S.PENDING
    # A week later (the stored period is the previous one): the first request of the new week fits.
    last_week = period_start("week", timezone.now()) - timedelta(days=7)
    Budget.objects.filter(pk=budget.pk).update(period_start=last_week)
    BudgetReservation.objects.update(period_start=last_week)
    _, fresh = ask(agent, "100.00")
    assert fresh.status == S.APPROVED
    row = Budget.objects.get(pk=budget.pk)
    assert row.used == Decimal("100.00") and row.period_start == period_start("week", timezone.now())
    # Last week's reservation ending unredeemed does not give this week's money back twice.
    assert agent.poll(first_id).status_code == 200
    ActionToken.objects.filter(approval=first).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert approval_expire(approval_id=first.pk)
    assert used(budget) == Decimal("100.00")
    refund = AuditEvent.objects.get(event="budget.refunded", detail__approval_id=str(first.pk))
    assert refund.detail["period_over"] is True


def test_an_auto_approve_rule_comes_first_and_spends_nothing(
    agent: Agent, budget: Budget, budget_policy: ScopePolicy
) -> None:
    scope_set(name="ledger:write", values={"auto_approve_rule": "amount <= 50"})
    _, approval = ask(agent, "40.00")
    assert approval.status == S.APPROVED and approval.decision_method == "auto_rule"
    assert used(budget) == 0

"""Budgets from the user's side: offered on the consent screen within the admin's maximum, shown on
/grants/ with what is left, lowered or ended at once (POST, CSRF). Every refusal changes nothing
and leaves one audit row with its stable reason."""

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from audit.models import AuditEvent
from consent.budget import Budget
from consent.budgets import BudgetChoice, budgets_create
from consent.models import ScopePolicy, SessionGrant
from consent.services import scope_set
from tests.conftest import PASSWORD, ClientResponse, OAuthFlow, Scenario, pkce_pair

pytestmark = pytest.mark.django_db

FIELD = "budget-ledger:write-"


@pytest.fixture
def budget_policy(ledger_policy: ScopePolicy) -> ScopePolicy:
    policy, _ = scope_set(
        name="ledger:write",
        values={
            "budget_currency": "USD",
            "budget_max_per_action": Decimal("1000.00"),
            "budget_max_total": Decimal("5000.00"),
            "budget_periods": ["week", "month"],
        },
    )
    return policy


def _consent(flow: OAuthFlow, **budget: str) -> tuple[str, ClientResponse]:
    flow.login()
    _, challenge = pkce_pair()
    query = flow.authorize_query(challenge=challenge)
    data = {"authz_query": query, "decision": "allow", "lifetime": "3600"}
    data.update({FIELD + k: v for k, v in budget.items()})
    return query, flow.client.post("/o/authorize/", data)


def test_the_consent_screen_offers_a_budget_within_the_admin_maximum(
    flow: OAuthFlow, budget_policy: ScopePolicy
) -> None:
    flow.login()
    _, challenge = pkce_pair()
    page = flow.client.get("/o/authorize/?" + flow.authorize_query(challenge=challenge)).content.decode()
    assert f'name="{FIELD}per_action"' in page and f'name="{FIELD}total"' in page
    assert "at most 1,000.00 USD each and 5,000.00 USD per period" in page
    assert '<option value="week">' in page and '<option value="day">' not in page


def test_no_budget_fields_where_the_policy_offers_none(flow: OAuthFlow, ledger_policy: ScopePolicy) -> None:
    flow.login()
    _, challenge = pkce_pair()
    page = flow.client.get("/o/authorize/?" + flow.authorize_query(challenge=challenge)).content.decode()
    assert FIELD not in page


def test_allow_with_a_budget_creates_it(
    flow: OAuthFlow, budget_policy: ScopePolicy, scenario: Scenario
) -> None:
    _, response = _consent(flow, per_action="500.00", total="2000.00", period="week", currency="USD")
    assert response.status_code == 302, response.content[:300]
    grant = SessionGrant.objects.get()
    budget = Budget.objects.get(grant=grant)
    assert (budget.scope, budget.per_action, budget.total, budget.period, budget.currency, budget.used) == (
        "ledger:write",
        Decimal("500.00"),
        Decimal("2000.00"),
        "week",
        "USD",
        Decimal(0),
    )
    event = AuditEvent.objects.get(event="budget.set")
    assert event.detail["total"] == "2000.00" and event.user_id == scenario.user.pk


def test_allow_without_amounts_gives_no_budget(flow: OAuthFlow, budget_policy: ScopePolicy) -> None:
    _, response = _consent(flow, per_action="", total="", period="week", currency="USD")
    assert response.status_code == 302
    assert SessionGrant.objects.count() == 1 and not Budget.objects.exists()


@pytest.mark.parametrize(
    ("budget", "code"),
    [
        (
            {"per_action": "1500.00", "total": "2000.00", "period": "week", "currency": "USD"},
            "budget_exceeded",
        ),
        (
            {"per_action": "500.00", "total": "9000.00", "period": "week", "currency": "USD"},
            "budget_exceeded",
        ),
        (
            {"per_action": "500.00", "total": "2000.00", "period": "week", "currency": "EUR"},
            "budget_currency",
        ),
        ({"per_action": "500.00", "total": "2000.00", "period": "day", "currency": "USD"}, "budget_invalid"),
        ({"per_action": "five", "total": "2000.00", "period": "week", "currency": "USD"}, "budget_invalid"),
        ({"per_action": "800.00", "total": "700.00", "period": "week", "currency": "USD"}, "budget_invalid"),
    ],
)
def test_a_refused_budget_at_consent_changes_nothing_and_is_audited_once(
    flow: OAuthFlow, budget_policy: ScopePolicy, budget: dict[str, str], code: str
) -> None:
    _, response = _consent(flow, **budget)
    assert response.status_code == 400
    assert "Budget not accepted" in response.content.decode()
    assert not SessionGrant.objects.exists() and not Budget.objects.exists()
    assert not AuditEvent.objects.filter(event__in=["consent.given", "budget.set"]).exists()
    refused = AuditEvent.objects.filter(event="budget.refused")
    assert refused.count() == 1 and refused.get().error == code and refused.get().outcome == "refused"


@pytest.fixture
def budget(flow: OAuthFlow, budget_policy: ScopePolicy, scenario: Scenario) -> Budget:
    _consent(flow)
    grant = SessionGrant.objects.get()
    (created,) = budgets_create(
        grant=grant,
        choices=[BudgetChoice("ledger:write", "500.00", "2000.00", "week", "USD")],
        actor="user:test",
    )
    Budget.objects.filter(pk=created.pk).update(used=Decimal("350.00"))
    return created


def test_grants_shows_what_is_left_and_the_user_lowers_it(flow: OAuthFlow, budget: Budget) -> None:
    page = flow.client.get("/grants/").content.decode()
    assert "1,650.00 USD left of 2,000.00 USD this week; up to 500.00 USD each" in page
    response = flow.client.post(
        f"/grants/{budget.grant_id}/budgets/{budget.pk}/lower/", {"per_action": "200.00", "total": "300.00"}
    )
    assert response.status_code == 302 and response["Location"] == "/grants/"
    row = Budget.objects.get(pk=budget.pk)
    assert (row.per_action, row.total, row.used) == (Decimal("200.00"), Decimal("300.00"), Decimal("350.00"))
    assert "0.00 USD left of 300.00 USD this week" in flow.client.get("/grants/").content.decode()
    assert AuditEvent.objects.filter(event="budget.lowered").count() == 1


def test_raising_instead_of_lowering_is_refused(flow: OAuthFlow, budget: Budget) -> None:
    response = flow.client.post(
        f"/grants/{budget.grant_id}/budgets/{budget.pk}/lower/", {"per_action": "600.00", "total": "2000.00"}
    )
    assert response.status_code == 400 and "budget_not_lowered" in response.content.decode()
    assert Budget.objects.get(pk=budget.pk).per_action == Decimal("500.00")
    assert AuditEvent.objects.get(event="budget.refused").error == "budget_not_lowered"


def test_the_user_ends_it_at_once(flow: OAuthFlow, budget: Budget) -> None:
    response = flow.client.post(
        f"/grants/{budget.grant_id}/budgets/{budget.pk}/end/", {"next": f"/grants/{budget.grant_id}/"}
    )
    assert response.status_code == 302 and response["Location"] == f"/grants/{budget.grant_id}/"
    assert Budget.objects.get(pk=budget.pk).status == Budget.Status.ENDED
    assert "left of" not in flow.client.get("/grants/").content.decode()
    # Ended, it can be given again from the connection's page.
    page = flow.client.get(f"/grants/{budget.grant_id}/").content.decode()
    assert f'action="/grants/{budget.grant_id}/budgets/"' in page
    response = flow.client.post(
        f"/grants/{budget.grant_id}/budgets/",
        {
            FIELD + "per_action": "100.00",
            FIELD + "total": "400.00",
            FIELD + "period": "month",
            FIELD + "currency": "USD",
        },
    )
    assert response.status_code == 302
    assert Budget.objects.get(status=Budget.Status.ACTIVE).total == Decimal("400.00")


def test_a_budget_above_the_admin_maximum_is_refused_from_grants_too(flow: OAuthFlow, budget: Budget) -> None:
    response = flow.client.post(
        f"/grants/{budget.grant_id}/budgets/",
        {
            FIELD + "per_action": "100.00",
            FIELD + "total": "400.00",
            FIELD + "period": "month",
            FIELD + "currency": "USD",
        },
    )
    assert response.status_code == 400  # one active budget per scope: lower or end it first
    Budget.objects.filter(pk=budget.pk).update(status=Budget.Status.ENDED)
    response = flow.client.post(
        f"/grants/{budget.grant_id}/budgets/",
        {
            FIELD + "per_action": "100.00",
            FIELD + "total": "99999.00",
            FIELD + "period": "month",
            FIELD + "currency": "USD",
        },
    )
    assert response.status_code == 400 and "budget_exceeded" in response.content.decode()
    assert not Budget.objects.filter(status=Budget.Status.ACTIVE).exists()


@pytest.mark.parametrize("action", ["lower", "end"])
def test_another_users_budget_is_404_unchanged_and_audited_once(budget: Budget, action: str) -> None:
    get_user_model().objects.create_user("intruder", password=PASSWORD)
    intruder = Client()
    assert intruder.login(username="intruder", password=PASSWORD)
    response = intruder.post(
        f"/grants/{budget.grant_id}/budgets/{budget.pk}/{action}/", {"per_action": "1.00", "total": "1.00"}
    )
    assert response.status_code == 404
    row = Budget.objects.get(pk=budget.pk)
    assert (row.status, row.per_action, row.total) == (
        Budget.Status.ACTIVE,
        Decimal("500.00"),
        Decimal("2000.00"),
    )
    refused = AuditEvent.objects.filter(event="budget.refused")
    assert refused.count() == 1 and refused.get().error == "budget_not_found"


def test_budget_forms_are_post_only_and_csrf_protected(flow: OAuthFlow, budget: Budget) -> None:
    assert flow.client.get(f"/grants/{budget.grant_id}/budgets/{budget.pk}/end/").status_code == 405
    strict = Client(enforce_csrf_checks=True)
    assert strict.login(username="officer", password=PASSWORD)
    assert strict.post(f"/grants/{budget.grant_id}/budgets/{budget.pk}/end/").status_code == 403
    assert Budget.objects.get(pk=budget.pk).status == Budget.Status.ACTIVE


def test_the_admin_maximum_is_checked_when_the_policy_is_set(ledger_policy: ScopePolicy) -> None:
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        scope_set(
            name="ledger:write", values={"budget_currency": "USD", "budget_max_per_action": Decimal("10")}
        )
    with pytest.raises(ValidationError):
        scope_set(
            name="catalog:read",
            values={
                "budget_currency": "USD",
                "budget_max_per_action": Decimal("10"),
                "budget_max_total": Decimal("100"),
                "budget_periods": ["week"],
            },
        )


def test_scope_set_offers_budgets_from_a_shell(ledger_policy: ScopePolicy) -> None:
    from django.core.management import call_command

    call_command(
        "scope_set",
        "ledger:write",
        audience="http://ledger.test",
        sensitivity="step_up",
        budget_currency="USD",
        budget_max_per_action="750.50",
        budget_max_total="3000",
        budget_periods="week month",
    )
    policy = type(ledger_policy).objects.get(name="ledger:write")
    assert policy.offers_budget and policy.budget_max_per_action == Decimal("750.50")
    assert policy.budget_periods == ["week", "month"]
    changed = AuditEvent.objects.filter(event="scope_policy.changed").latest("id")
    assert changed.detail["budget_max_per_action"] == "750.50"


def test_the_admin_lists_budgets_read_only(budget: Budget, admin_client: Client) -> None:
    page = admin_client.get("/admin/consent/budget/")
    assert page.status_code == 200 and "ledger:write" in page.content.decode()
    assert admin_client.get("/admin/consent/budget/add/").status_code == 403

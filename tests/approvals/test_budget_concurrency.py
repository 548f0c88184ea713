"""100 concurrent step-up requests against one budget never reserve more than its total
(PostgreSQL: real threads, each with its own connection, as in tests/approvals/test_concurrency.py).

The requests go through the request path's service (``approval_request_create``), each for a
distinct purchase; the conditional UPDATE on the budget row alone decides which fit.
"""

import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, cast

import pytest
from django.db import connection
from pytest_django import Settings

from approvals.models import ApprovalRequest, BudgetReservation
from approvals.services import approval_request_create
from consent.budget import Budget
from consent.budgets import BudgetChoice, budgets_create
from consent.keys import active_signing_key
from consent.models import ScopePolicy, SessionGrant
from consent.services import scope_set
from tests.approvals.support import backchannel_request, install_outbox, ledger_entry, session_grant
from tests.conftest import Scenario

if TYPE_CHECKING:
    from django.db.backends.postgresql.base import DatabaseWrapper as PgDatabaseWrapper

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS = 100


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail(
            "concurrency tests need PostgreSQL row locking: set DATABASE_URL=postgres://... (make test)"
        )


@pytest.fixture
def grant(
    scenario: Scenario, ledger_policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> SessionGrant:
    install_outbox(monkeypatch, run_pushes=False)
    # Prompts for what does not fit must not be capped away: every request gets an answer.
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "MAX_PENDING_PER_USER": 1000,
        "MAX_PENDING_PER_AGENT": 1000,
        "MAX_PROMPTS_PER_USER_IN_WINDOW": 1000,
        "MAX_PROMPTS_PER_AGENT_IN_WINDOW": 1000,
    }
    scope_set(
        name="ledger:write",
        values={
            "budget_currency": "USD",
            "budget_max_per_action": Decimal("500"),
            "budget_max_total": Decimal("5000"),
            "budget_periods": ["week"],
        },
    )
    active_signing_key()
    return session_grant(scenario)


@pytest.fixture(autouse=True)
def _a_connection_per_thread() -> Iterator[None]:
    """The process's pool (config.settings) holds 20; here every racing thread holds its own."""
    pool = connection.settings_dict.get("OPTIONS", {}).get("pool")
    if not isinstance(pool, dict):
        yield
        return
    size = pool["max_size"]
    cast("PgDatabaseWrapper", connection).close_pool()
    pool["max_size"] = REQUESTS + 5
    yield
    cast("PgDatabaseWrapper", connection).close_pool()
    pool["max_size"] = size


def _threads_we_may_open() -> int:
    """One connection per thread, within what the shared server has free (other test runs use it too)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('max_connections')::int - (SELECT COUNT(*) FROM pg_stat_activity)"
        )
        free: int = cursor.fetchone()[0]
    return max(8, min(REQUESTS, free - 15))


def _race(amounts: list[str], grant: SessionGrant) -> list[object]:
    threads_n = _threads_we_may_open()
    barrier = threading.Barrier(threads_n)
    results: list[object] = [None] * len(amounts)

    def worker(t: int) -> None:
        try:
            connection.ensure_connection()
            barrier.wait(timeout=60)
            for i in range(t, len(amounts), threads_n):
                req = backchannel_request(grant, [ledger_entry(amounts[i], purchase_order=f"PO-RACE-{i}")])
                results[i] = approval_request_create(req=req)[0].status
        except BaseException as exc:  # noqa: BLE001 - inspected below
            results[t] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a racing thread never finished"
    return results


@pytest.mark.parametrize("round_", range(2))
def test_concurrent_requests_never_spend_more_than_the_budget(
    grant: SessionGrant, scenario: Scenario, round_: int
) -> None:
    (budget,) = budgets_create(
        grant=grant,
        choices=[BudgetChoice("ledger:write", "100.00", "1000.00", "week", "USD")],
        actor="user:test",
    )
    # 100 requests of 30.00 to 45.00: far more than 1,000.00 together.
    amounts = [f"{30 + (i % 4) * 5}.{round_:02d}" for i in range(REQUESTS)]
    results = _race(amounts, grant)
    assert not [r for r in results if isinstance(r, BaseException)], results
    row = Budget.objects.get(pk=budget.pk)
    reserved = BudgetReservation.objects.filter(budget=budget, state=BudgetReservation.State.RESERVED)
    approved = ApprovalRequest.objects.filter(
        grant=grant, status=ApprovalRequest.Status.APPROVED, decision_method="budget"
    )
    total_reserved = sum((r.amount for r in reserved), Decimal(0))
    assert row.used == total_reserved <= row.total
    assert approved.count() == reserved.count() == results.count(ApprovalRequest.Status.APPROVED)
    assert set(approved.values_list("pk", flat=True)) == set(reserved.values_list("approval_id", flat=True))
    # Serialised on the budget row: requests were turned away only once the rest no longer fit.
    assert row.total - row.used < Decimal("45.00") + Decimal("1")
    assert results.count(ApprovalRequest.Status.PENDING) == REQUESTS - approved.count() > 0
    # Whoever lost a race is told why on the prompt, like a request that never fitted.
    notes = set(
        ApprovalRequest.objects.filter(grant=grant, status=ApprovalRequest.Status.PENDING).values_list(
            "budget_note", flat=True
        )
    )
    assert notes and all("left of your 1,000.00 USD weekly budget" in n for n in notes), notes

"""Reservations against a user's budget (``consent.budget.Budget``): the request path's
approval without a prompt, and the refund when such an approval ends unredeemed.

Every change to ``Budget.used`` is one conditional UPDATE whose row count decides (never
read-then-write): concurrent requests serialise on the budget row, and PostgreSQL re-evaluates
the WHERE clause on the row the first writer committed, so no set of them spends past ``total``.
What this module reads beforehand (the budget's currency, ceiling, what is left) only words the
prompt when the request does not fit; the UPDATE alone decides whether it does.
"""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.utils import timezone

from audit.services import PendingEvent, audit_event
from consent import rows
from consent.budget import Budget, money, period_start, plain
from consent.rules import amount_of

from .models import ApprovalRequest, BudgetReservation

BUDGET = "budget"  # ApprovalRequest.decision_method of a budget approval
_BUDGET = rows.table(Budget)
_RESERVATION = rows.table(BudgetReservation)
_RESERVED = BudgetReservation.State.RESERVED
_PERIOD_NOUN = {"day": "daily", "week": "weekly", "month": "monthly"}

# The amount fits: same currency and period, active, within the ceiling, and within what is left of
# the current period (a budget still in an older period starts the current one from nothing).
_RESERVE = (
    f"UPDATE {_BUDGET} SET used = CASE WHEN period_start = %s THEN used + %s ELSE %s END,"
    f" period_start = %s WHERE id = %s AND status = %s AND currency = %s AND period = %s"
    f" AND per_action >= %s AND period_start <= %s"
    f" AND CASE WHEN period_start = %s THEN used + %s ELSE %s END <= total"
)
_REFUND_ROW = (
    f"UPDATE {_RESERVATION} SET state = %s, settled_at = %s WHERE approval_id = %s AND state = %s"
    f" RETURNING budget_id, amount, currency, period_start"
)
# Only into the period the amount counted in: a later period began from nothing already.
_REFUND = f"UPDATE {_BUDGET} SET used = used - %s WHERE id = %s AND period_start = %s AND used >= %s"
# Redemption (approvals.redemption): the reservation of the request that moved is spent; on
# PostgreSQL a data-modifying CTE of the redemption's one statement (``moved``: the request's id).
SPEND = f"UPDATE {_RESERVATION} SET state = %s, settled_at = %s WHERE approval_id = %s AND state = %s"
SPEND_CTE = (
    f"UPDATE {_RESERVATION} r SET state = %s, settled_at = %s FROM moved"
    f" WHERE r.approval_id = moved.id AND r.state = %s"
)


@dataclass(frozen=True)
class Fit:
    """What the budget says of one request before the reservation is tried."""

    amount: Decimal | None  # to reserve; None: the request prompts, for ``why``
    currency: str = ""
    why: str = ""


def budget_fit(budget: Budget | None, details: list[dict[str, Any]], now: datetime) -> Fit | None:
    """None without a budget; otherwise the amount to try, or why the request prompts (the prompt's note)."""
    if budget is None or budget.status != Budget.Status.ACTIVE:
        return None
    counted = amount_of(details)
    noun = _PERIOD_NOUN.get(budget.period, "")
    if counted is None:
        return Fit(None, why="it carries no amount your budget can count")
    amount, currency = counted
    if currency != budget.currency:
        return Fit(None, why=f"it is in {currency}; your budget is in {budget.currency}")
    if amount > budget.per_action:
        return Fit(None, why=f"over your {money(budget.per_action, budget.currency)} per-purchase budget")
    left = budget.left(now)
    if amount > left:
        return Fit(
            None,
            why=f"over what is left of your {money(budget.total, budget.currency)} {noun} budget"
            f" ({money(left, budget.currency)} left)",
        )
    return Fit(amount, currency)


def budget_reserve(*, budget: Budget, approval: ApprovalRequest, amount: Decimal, now: datetime) -> bool:
    """Count ``amount`` against ``budget`` for ``approval`` (in the transaction that created it).

    True if the one conditional UPDATE matched: the reservation row is written with it. False:
    the amount did not fit (any more), and nothing changed.
    """
    current = period_start(budget.period, now)
    at = rows.param(Budget, "period_start", current)
    value = rows.param(Budget, "used", amount)
    moved = rows.execute(
        _RESERVE,
        [
            at,
            value,
            value,
            at,
            budget.pk,
            Budget.Status.ACTIVE,
            budget.currency,
            budget.period,
            value,
            at,
            at,
            value,
            value,
        ],
    )
    if moved != 1:
        return False
    BudgetReservation.objects.create(
        approval=approval,
        budget_id=budget.pk,
        amount=amount,
        currency=budget.currency,
        period_start=current,
        created=now,
    )
    return True


def budget_approved_event(approval: ApprovalRequest, *, budget: Budget, amount: Decimal) -> PendingEvent:
    return audit_event(
        event="approval.budget_approved",
        actor="system",
        user_id=approval.user_id,
        client_id=approval.agent.client_id,
        grant_id=approval.grant_id,
        detail={
            "approval_id": str(approval.pk),
            "scope": approval.scope,
            "budget_id": budget.pk,
            "amount": str(amount),
            "currency": budget.currency,
        },
    )


def budget_refund(*, approval: ApprovalRequest, reason: str) -> bool:
    """Return the amount an approval reserved, once: the conditional UPDATE of its reservation
    decides (a second call, or a task run twice, finds nothing reserved). Audited."""
    row = rows.fetchone(
        _REFUND_ROW,
        [
            BudgetReservation.State.REFUNDED,
            rows.param(BudgetReservation, "settled_at", timezone.now()),
            rows.param(BudgetReservation, "approval", approval.pk),
            _RESERVED,
        ],
    )
    if row is None:
        return False
    budget_id, amount, currency, counted_in = row
    amount = Decimal(str(amount))
    value = rows.param(Budget, "used", amount)
    returned = rows.execute(_REFUND, [value, budget_id, counted_in, value]) == 1
    audit_event(
        event="budget.refunded",
        actor="system",
        user_id=approval.user_id,
        client_id=approval.agent.client_id,
        grant_id=approval.grant_id,
        detail={
            "approval_id": str(approval.pk),
            "scope": approval.scope,
            "budget_id": budget_id,
            "amount": plain(amount),
            "currency": currency,
            "reason": reason,
            "period_over": not returned,
        },
    ).append()
    return True


def spend_params(now: datetime) -> list[Any]:
    """The parameters of ``SPEND_CTE``."""
    return [BudgetReservation.State.SPENT, rows.param(BudgetReservation, "settled_at", now), _RESERVED]


def budget_spend(*, approval_id: Any, now: datetime) -> None:
    """Outside PostgreSQL, after the request moved ISSUED -> REDEEMED in this transaction."""
    rows.execute(
        SPEND,
        [
            BudgetReservation.State.SPENT,
            rows.param(BudgetReservation, "settled_at", now),
            rows.param(BudgetReservation, "approval", approval_id),
            _RESERVED,
        ],
    )

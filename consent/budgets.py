"""Budgets: set at consent or later from ``/grants/<id>/``, lowered or ended from ``/grants/``.

A user may give an agent a budget on a step-up scope whose policy offers one
(``ScopePolicy.offers_budget``), never above the administrator's maximum. Every refusal is a
``consent.errors.BudgetRefused`` (or ``BudgetNotFound``) raised before anything is written; the
view audits it once (``budget_refusal_audit``). Reservations against a budget are
``approvals.budgets``'.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.http import HttpRequest
from django.utils import timezone

from audit.services import audit_record, audit_refusal

from .budget import Budget, money, period_start
from .errors import (
    BudgetCurrency,
    BudgetExceeded,
    BudgetNotFound,
    BudgetNotLowered,
    BudgetNotOffered,
    BudgetRefused,
    OAuthError,
)
from .models import ScopePolicy, SessionGrant
from .rules import parse_amount


@dataclass(frozen=True)
class BudgetChoice:
    """One budget as the form carried it (strings, unparsed)."""

    scope: str
    per_action: str
    total: str
    period: str
    currency: str


def budget_choices(data: Mapping[str, str], scopes: Iterable[str]) -> list[BudgetChoice]:
    """The budgets a form asks for: ``budget-<scope>-per_action``, ``-total``, ``-period``,
    ``-currency`` per scope; a scope whose two amounts are both empty asks for none."""
    choices = []
    for scope in scopes:
        field = f"budget-{scope}-"
        per_action, total = data.get(field + "per_action", "").strip(), data.get(field + "total", "").strip()
        if per_action or total:
            choices.append(
                BudgetChoice(
                    scope=scope,
                    per_action=per_action,
                    total=total,
                    period=data.get(field + "period", ""),
                    currency=data.get(field + "currency", "").strip().upper(),
                )
            )
    return choices


def budget_policies(scopes: Iterable[str]) -> list[ScopePolicy]:
    """The step-up policies among ``scopes`` that offer a budget (for the forms)."""
    return [
        p
        for p in ScopePolicy.objects.filter(
            name__in=list(scopes), sensitivity=ScopePolicy.Sensitivity.STEP_UP
        )
        if p.offers_budget
    ]


def _amounts(per_action: str, total: str) -> tuple[Decimal, Decimal]:
    per, whole = parse_amount(per_action), parse_amount(total)
    if per is None or whole is None:
        raise BudgetRefused("give both amounts as positive decimal numbers, e.g. 500.00")
    if per > whole:
        raise BudgetRefused("the amount per action cannot be more than the total per period")
    return per, whole


def _checked(policy: ScopePolicy | None, choice: BudgetChoice) -> tuple[Decimal, Decimal]:
    if policy is None or not policy.offers_budget:
        raise BudgetNotOffered(f"{choice.scope} offers no budget")
    if choice.currency != policy.budget_currency:
        raise BudgetCurrency(f"budgets for {policy.name} are in {policy.budget_currency}")
    if choice.period not in policy.budget_periods:
        raise BudgetRefused(f"choose a period of {', '.join(policy.budget_periods)}")
    per, whole = _amounts(choice.per_action, choice.total)
    assert policy.budget_max_per_action is not None and policy.budget_max_total is not None
    if per > policy.budget_max_per_action:
        raise BudgetExceeded(
            f"at most {money(policy.budget_max_per_action, policy.budget_currency)} per action"
        )
    if whole > policy.budget_max_total:
        raise BudgetExceeded(f"at most {money(policy.budget_max_total, policy.budget_currency)} per period")
    return per, whole


def _event(grant: SessionGrant, event: str, actor: str, request: HttpRequest | None, **detail: Any) -> None:
    audit_record(
        event=event,
        actor=actor,
        user_id=grant.user_id,
        client_id=grant.agent.client_id,
        grant_id=grant.pk,
        request=request,
        detail=detail,
    )


def budgets_create(
    *, grant: SessionGrant, choices: list[BudgetChoice], actor: str, request: HttpRequest | None = None
) -> list[Budget]:
    """One budget per choice, on the grant's step-up scopes, each within its policy's maximum.

    All or none: the first refusal raises before any row is written (inside the caller's
    transaction at consent, so the grant is not created either).
    """
    policies = {p.name: p for p in ScopePolicy.objects.filter(name__in=[c.scope for c in choices])}
    now = timezone.now()
    checked = []
    for choice in choices:
        if choice.scope not in grant.step_up_scopes:
            raise BudgetNotOffered(f"{choice.scope} is not a step-up scope of this connection")
        checked.append((choice, *_checked(policies.get(choice.scope), choice)))
    if not grant.is_live(now):
        raise BudgetNotFound("the connection has ended")
    budgets = []
    try:
        with transaction.atomic():
            for choice, per, whole in checked:
                budget = Budget.objects.create(
                    grant=grant,
                    scope=choice.scope,
                    currency=choice.currency,
                    per_action=per,
                    total=whole,
                    period=choice.period,
                    period_start=period_start(choice.period, now),
                    created=now,
                )
                _event(
                    grant,
                    "budget.set",
                    actor,
                    request,
                    budget_id=budget.pk,
                    scope=budget.scope,
                    currency=budget.currency,
                    per_action=str(per),
                    total=str(whole),
                    period=budget.period,
                )
                budgets.append(budget)
    except IntegrityError as exc:  # the unique active budget per (grant, scope)
        raise BudgetRefused("this connection has a budget on that scope already; lower or end it") from exc
    return budgets


def _owned(budget_id: Any, user_id: int) -> Budget:
    budget = (
        Budget.objects.select_related("grant__agent")
        .filter(pk=budget_id, grant__user_id=user_id, status=Budget.Status.ACTIVE)
        .first()
    )
    if budget is None:
        raise BudgetNotFound("no active budget of yours with that id")
    return budget


def budget_lower(
    *, budget_id: Any, user_id: int, per_action: str, total: str, request: HttpRequest | None = None
) -> Budget:
    """Lower the ceiling and/or the period total at once; never raise them.

    Below what is already used this period, existing reservations stand and new ones do not fit.
    One conditional UPDATE: a concurrent lowering or ending makes it match nothing.
    """
    budget = _owned(budget_id, user_id)
    per, whole = _amounts(per_action, total)
    if per > budget.per_action or whole > budget.total:
        raise BudgetNotLowered(f"you can lower this budget below {budget.describe()}, not raise it")
    with transaction.atomic():
        changed = Budget.objects.filter(
            pk=budget.pk, status=Budget.Status.ACTIVE, per_action__gte=per, total__gte=whole
        ).update(per_action=per, total=whole)
        if changed != 1:
            raise BudgetNotFound("the budget changed or ended meanwhile")
        budget.per_action, budget.total = per, whole
        _event(
            budget.grant,
            "budget.lowered",
            f"user:{user_id}",
            request,
            budget_id=budget.pk,
            scope=budget.scope,
            currency=budget.currency,
            per_action=str(per),
            total=str(whole),
        )
    return budget


def budget_end(*, budget_id: Any, user_id: int, request: HttpRequest | None = None) -> Budget:
    """End the budget at once: every later request prompts; reservations made stand."""
    budget = _owned(budget_id, user_id)
    with transaction.atomic():
        now = timezone.now()
        if (
            Budget.objects.filter(pk=budget.pk, status=Budget.Status.ACTIVE).update(
                status=Budget.Status.ENDED, ended_at=now
            )
            != 1
        ):
            raise BudgetNotFound("the budget has ended already")
        budget.status, budget.ended_at = Budget.Status.ENDED, now
        _event(
            budget.grant, "budget.ended", f"user:{user_id}", request, budget_id=budget.pk, scope=budget.scope
        )
    return budget


def budget_refusal_audit(
    exc: OAuthError, *, user_id: int, request: HttpRequest | None = None, **detail: Any
) -> None:
    """The one audit row of a refused budget change."""
    audit_refusal(
        event="budget.refused",
        error=exc.reason_code,
        actor=f"user:{user_id}",
        user_id=user_id,
        request=request,
        detail={"reason": exc.reason, **{k: str(v) for k, v in detail.items()}},
    )


def budgets_for_grants(grant_ids: Iterable[Any]) -> dict[Any, list[Budget]]:
    """The active budgets of these grants, by grant id."""
    found: dict[Any, list[Budget]] = {}
    for budget in Budget.objects.filter(grant_id__in=list(grant_ids), status=Budget.Status.ACTIVE):
        found.setdefault(budget.grant_id, []).append(budget)
    return found

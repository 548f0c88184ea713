"""The person's budget forms on ``/grants/`` and ``/grants/<id>/``: give a budget to a live
connection, lower one, end one (POST, CSRF). Each calls one ``consent.budgets`` service; a refusal
is audited once and answered with a page that says why (404 for a budget or connection that is not
the user's)."""

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render

from audit.decorators import post_only

from ..budgets import budget_choices, budget_end, budget_lower, budget_refusal_audit, budgets_create
from ..errors import BudgetNotFound, BudgetRefused
from ..http import AuthenticatedHttpRequest
from ..models import SessionGrant


def _back(request: AuthenticatedHttpRequest, grant_id: Any) -> str:
    detail = f"/grants/{grant_id}/"
    return detail if request.POST.get("next") == detail else "/grants/"


def _refused(
    request: AuthenticatedHttpRequest, exc: BudgetRefused | BudgetNotFound, back: str, **detail: Any
) -> HttpResponse:
    budget_refusal_audit(exc, user_id=request.user.pk, request=request, **detail)
    if isinstance(exc, BudgetNotFound):
        raise Http404("No such budget.")
    return render(
        request,
        "consent/budget_refused.html",
        {"reason": exc.description, "code": exc.reason_code, "back": back},
        status=exc.status_code,
    )


@login_required
@post_only
def budget_add_view(request: AuthenticatedHttpRequest, grant_id: Any) -> HttpResponse:
    back = _back(request, grant_id)
    grant = SessionGrant.objects.select_related("agent").filter(pk=grant_id, user_id=request.user.pk).first()
    try:
        if grant is None:
            raise BudgetNotFound("no connection of yours with that id")
        choices = budget_choices(request.POST, grant.step_up_scopes)
        if not choices:
            raise BudgetRefused("give an amount per action and a total")
        budgets_create(grant=grant, choices=choices, actor=f"user:{request.user.pk}", request=request)
    except (BudgetRefused, BudgetNotFound) as exc:
        return _refused(request, exc, back, grant_id=grant_id)
    messages.success(request, "Budget set. Requests within it are approved without asking you.")
    return redirect(back)


@login_required
@post_only
def budget_lower_view(request: AuthenticatedHttpRequest, grant_id: Any, budget_id: int) -> HttpResponse:
    back = _back(request, grant_id)
    try:
        budget = budget_lower(
            budget_id=budget_id,
            user_id=request.user.pk,
            per_action=request.POST.get("per_action", "").strip(),
            total=request.POST.get("total", "").strip(),
            request=request,
        )
    except (BudgetRefused, BudgetNotFound) as exc:
        return _refused(request, exc, back, budget_id=budget_id)
    messages.success(request, f"Budget lowered: now {budget.describe()}.")
    return redirect(back)


@login_required
@post_only
def budget_end_view(request: AuthenticatedHttpRequest, grant_id: Any, budget_id: int) -> HttpResponse:
    back = _back(request, grant_id)
    try:
        budget_end(budget_id=budget_id, user_id=request.user.pk, request=request)
    except BudgetNotFound as exc:
        return _refused(request, exc, back, budget_id=budget_id)
    messages.success(request, "Budget ended. Every request asks you again.")
    return redirect(back)

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from .activity import agent_choices, describe, period_filter
from .selectors import OUTCOMES, PERIODS, audit_events_for_user


@login_required
def activity_view(request):
    """The user's own trail, in sentences; filters by agent, outcome and period (GET, bookmarkable)."""
    agents = agent_choices(user_id=request.user.pk)
    client_id = request.GET.get("agent", "")
    client_id = client_id if client_id in {c for c, _ in agents} else ""
    outcome = request.GET.get("outcome", "")
    outcome = outcome if outcome in OUTCOMES else ""
    period = request.GET.get("period", "")
    period = period if period in PERIODS else ""
    events = list(audit_events_for_user(user_id=request.user.pk, client_id=client_id, outcome=outcome,
                                        where=period_filter(period)))
    return render(request, "audit/activity.html", {
        "entries": describe(events, user_id=request.user.pk), "agents": agents, "periods": PERIODS.items(),
        "chosen": {"agent": client_id, "outcome": outcome, "period": period},
        "filtered": bool(client_id or outcome or period),
    })


def csrf_failure(request, reason=""):
    """CSRF refusals are refusals too: audited, then Django's 403 page."""
    from django.views.csrf import csrf_failure as django_csrf_failure

    from .services import audit_refusal

    user = getattr(request, "user", None)
    user_id = user.pk if user is not None and user.is_authenticated else None
    audit_refusal(event="csrf.refused", error="csrf_failed", actor=f"user:{user_id}" if user_id else "",
                  user_id=user_id, request=request, detail={"path": request.path[:200], "reason": reason[:200]})
    return django_csrf_failure(request, reason=reason)

"""The person's own pages that tell what happened: Activity (``/activity/``), Connected agents
(``/grants/``) and the story of one connection (``/grants/<id>/``). Reads only; Revoke is
``consent.views.account.grant_revoke_view``.

They live here, at the top app, because they tell of every app's records: consents and grants
(consent), prompts, decisions, redemptions and receipts (approvals), and the audit trail (audit).
"""

from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import render

from audit.selectors import OUTCOMES, PERIODS, audit_events_for_user
from audit.services import audit_refusal
from consent.http import AuthenticatedHttpRequest
from consent.selectors import grants_for_user

from .activity import agent_choices, describe, period_filter
from .story import grant_story, grants_overview


@login_required
def activity_view(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The user's own trail, in sentences; filters by agent, outcome and period (GET, bookmarkable)."""
    agents = agent_choices(user_id=request.user.pk)
    client_id = request.GET.get("agent", "")
    client_id = client_id if client_id in {c for c, _ in agents} else ""
    outcome = request.GET.get("outcome", "")
    outcome = outcome if outcome in OUTCOMES else ""
    period = request.GET.get("period", "")
    period = period if period in PERIODS else ""
    events = list(
        audit_events_for_user(
            user_id=request.user.pk, client_id=client_id, outcome=outcome, where=period_filter(period)
        )
    )
    return render(
        request,
        "audit/activity.html",
        {
            "entries": describe(events, user_id=request.user.pk),
            "agents": agents,
            "periods": PERIODS.items(),
            "chosen": {"agent": client_id, "outcome": outcome, "period": period},
            "filtered": bool(client_id or outcome or period),
        },
    )


@login_required
def grants_view(request: AuthenticatedHttpRequest) -> HttpResponse:
    grants = list(grants_for_user(user=request.user)[:100])
    summaries = grants_overview(grants=grants, user_id=request.user.pk)
    return render(
        request,
        "consent/grants.html",
        {
            "active": [s for s in summaries if s.grant.is_live()],
            "ended": [s.grant for s in summaries if not s.grant.is_live()],
        },
    )


@login_required
def grant_detail_view(request: AuthenticatedHttpRequest, grant_id: UUID) -> HttpResponse:
    """The story of one connection, from consent to its end; ``?part=timeline`` is just the list,
    which the page re-reads when the websocket says something changed."""
    story = grant_story(grant_id=grant_id, user_id=request.user.pk)
    if story is None:
        audit_refusal(
            event="grant.view_refused",
            error="not_found",
            actor=f"user:{request.user.pk}",
            user_id=request.user.pk,
            request=request,
            detail={"grant_id": str(grant_id), "reason": "no grant of this user"},
        )
        raise Http404("No such connection.")
    template = (
        "consent/_timeline.html" if request.GET.get("part") == "timeline" else "consent/grant_detail.html"
    )
    return render(
        request,
        template,
        {
            "story": story,
            "grant": story.grant,
            "live": story.grant.is_live(),
            "detail_url": f"/grants/{story.grant.pk}/",
        },
    )

"""What a person can learn about their connections: the overview on /grants/ and the story of
one session grant on /grants/<id>/ (reads only).

The story is told from the audit trail (every consent, token, prompt, decision, redemption and
end names its grant) and from the uses resource servers reported (``GrantUse``).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Count, Max, Q

from audit.models import AuditEvent
from consent.budget import Budget
from consent.budgets import budget_policies, budgets_for_grants
from consent.instances import instances_for_grant
from consent.models import AgentInstance, GrantUse, ResourceServer, ScopePolicy, SessionGrant

from .activity import Entry, describe
from .models import ApprovalRequest
from .wording import auth_words

TOKEN_EVENTS = ("token.issued", "token.refreshed", "token.exchanged", "token.delegated")
# Told from GrantUse rows (one per use) rather than from their audit rows (one per report).
_TOLD_ELSEWHERE = ("grant.used",)
TIMELINE_LIMIT = 500


@dataclass
class GrantSummary:
    grant: SessionGrant
    last_used: datetime | None = None
    uses: int = 0
    tokens: int = 0
    approvals: int = 0
    now: str = ""
    now_at: datetime | None = None
    budgets: list[Budget] = field(default_factory=list)


@dataclass
class Story:
    grant: SessionGrant
    signed_in_with: str
    entries: list[Entry] = field(default_factory=list)
    receipts: dict[str, str] = field(default_factory=dict)  # approval id -> its receipt URL
    budgets: list[Budget] = field(default_factory=list)  # active ones
    budget_offers: list[ScopePolicy] = field(default_factory=list)  # step-up scopes a budget may be set on
    instances: list[AgentInstance] = field(default_factory=list)  # the agent's instances on this grant


def grants_overview(*, grants: list[SessionGrant], user_id: int) -> list[GrantSummary]:
    """Each grant with its last use, how much it was used, and the latest thing it did."""
    ids = [g.pk for g in grants]
    uses = {
        r["grant_id"]: r
        for r in GrantUse.objects.filter(grant_id__in=ids)
        .values("grant_id")
        .annotate(n=Count("id"), last=Max("used_at"))
    }
    events = {
        r["grant_id"]: r
        for r in AuditEvent.objects.filter(grant_id__in=[str(i) for i in ids])
        .values("grant_id")
        .annotate(
            last=Max("occurred_at", filter=Q(actor__startswith="agent:")),
            tokens=Count("id", filter=Q(event__in=TOKEN_EVENTS, outcome="ok")),
            approvals=Count("id", filter=Q(event="approval.requested")),
        )
    }
    budgets = budgets_for_grants(ids)
    summaries = []
    for g in grants:
        used: Mapping[str, Any] = uses.get(g.pk, {})
        seen: Mapping[str, Any] = events.get(str(g.pk), {})
        lasts = [t for t in (used.get("last"), seen.get("last")) if t is not None]
        summary = GrantSummary(
            grant=g,
            last_used=max(lasts) if lasts else None,
            uses=used.get("n", 0),
            tokens=seen.get("tokens", 0),
            approvals=seen.get("approvals", 0),
            budgets=budgets.get(g.pk, []),
        )
        if g.is_live():
            summary.now, summary.now_at = _latest(g, user_id)
        summaries.append(summary)
    return summaries


def _latest(grant: SessionGrant, user_id: int) -> tuple[str, datetime | None]:
    """The most recent thing that happened on a live grant, as a sentence."""
    event = (
        AuditEvent.objects.filter(grant_id=str(grant.pk), user_id=user_id)
        .exclude(event__in=_TOLD_ELSEWHERE)
        .order_by("-occurred_at", "-id")
        .first()
    )
    use = GrantUse.objects.filter(grant=grant).order_by("-used_at", "-id").first()
    if use is not None and (event is None or use.used_at >= event.occurred_at):
        return _use_entry(use, grant, _systems([use])).sentence, use.used_at
    if event is None:
        return "", None
    (entry,) = describe([event], user_id=user_id)
    return entry.sentence, entry.when


def _systems(uses: list[GrantUse]) -> dict[int, str]:
    return dict(
        ResourceServer.objects.filter(pk__in={u.resource_server_id for u in uses}).values_list("pk", "name")
    )


def _use_entry(use: GrantUse, grant: SessionGrant, systems: dict[int, str]) -> Entry:
    system = systems.get(use.resource_server_id, "a system")
    what = use.operation or f"a request needing {use.scope}"
    verb = "served" if use.outcome in ("accepted", "ok") else "refused"
    return Entry(
        id=-use.pk,
        when=use.used_at,
        sentence=f"{system} {verb} {grant.agent.name}: {what}.",
        ok=verb == "served",
        event="grant.used",
        grant_id=str(grant.pk),
        agent=grant.agent.name,
    )


def grant_story(*, grant_id: Any, user_id: int) -> Story | None:
    """One grant of this user's, from consent to its end, oldest first; None if it is not theirs."""
    grant = SessionGrant.objects.select_related("agent").filter(pk=grant_id, user_id=user_id).first()
    if grant is None:
        return None
    events = list(
        AuditEvent.objects.filter(grant_id=str(grant.pk), user_id=user_id)
        .exclude(event__in=_TOLD_ELSEWHERE)
        .order_by("occurred_at", "id")[:TIMELINE_LIMIT]
    )
    uses = list(GrantUse.objects.filter(grant=grant).order_by("used_at", "id")[:TIMELINE_LIMIT])
    systems = _systems(uses)
    entries = describe(events, user_id=user_id) + [_use_entry(u, grant, systems) for u in uses]
    entries.sort(key=lambda e: (e.when, e.id if e.id > 0 else 0))
    receipts = {
        str(pk): f"/approvals/{pk}/receipt/"
        for pk in ApprovalRequest.objects.filter(
            grant=grant, status=ApprovalRequest.Status.REDEEMED
        ).values_list("pk", flat=True)
    }
    budgets = budgets_for_grants([grant.pk]).get(grant.pk, []) if grant.is_live() else []
    with_budget = {b.scope for b in budgets}
    offers = (
        [p for p in budget_policies(grant.step_up_scopes) if p.name not in with_budget]
        if grant.is_live()
        else []
    )
    return Story(
        grant=grant,
        signed_in_with=auth_words(grant.amr),
        entries=entries,
        receipts=receipts,
        budgets=budgets,
        budget_offers=offers,
        instances=instances_for_grant(grant_id=grant.pk),
    )

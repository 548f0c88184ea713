"""Two-person approval: who may answer a request a quorum decides, and where it stands (reads only).

A step-up scope policy may ask for ``quorum`` approvals from the active members of
``approver_group`` (and from the user the agent acts for, unless ``exclude_requester``), only for
requests matching ``quorum_when`` (the auto-approve grammar of ``consent.rules``; empty: all). The
policy and the group's membership are read as they stand at each vote, so an approver removed
from the group while a prompt waits neither votes again nor keeps the approval they gave.

The votes themselves are written by ``approvals.votes``.
"""

from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone

from consent.models import ScopePolicy
from consent.rules import rule_matches

from .delivery import prompt_payload
from .models import ApprovalRequest, ApprovalVote

NOT_AN_APPROVER = "not_an_approver"
REQUESTER_EXCLUDED = "requester_excluded"


@dataclass(frozen=True)
class Quorum:
    """What a policy asks of one request: ``size`` approvals from the group ``group_id``."""

    size: int
    group_id: int | None
    exclude_requester: bool


def quorum_of(
    *,
    size: int | None,
    group_id: int | None,
    exclude_requester: bool,
    when: str,
    details: list[dict[str, Any]],
) -> Quorum | None:
    """The quorum a policy with these fields asks of a request with ``details``; None: the user alone."""
    if (size or 1) <= 1 and group_id is None and not exclude_requester:
        return None
    if when and not rule_matches(when, details):
        return None
    return Quorum(size=max(1, size or 1), group_id=group_id, exclude_requester=exclude_requester)


def quorum_for(*, scope: str, details: list[dict[str, Any]]) -> Quorum | None:
    """The quorum the scope's policy asks of a request with ``details`` (one statement)."""
    row = (
        ScopePolicy.objects.filter(name=scope)
        .values_list("quorum", "approver_group_id", "exclude_requester", "quorum_when")
        .first()
    )
    if row is None:
        return None
    return quorum_of(size=row[0], group_id=row[1], exclude_requester=row[2], when=row[3], details=details)


def policy_quorum(policy: ScopePolicy, details: list[dict[str, Any]]) -> Quorum | None:
    return quorum_of(
        size=policy.quorum,
        group_id=policy.approver_group_id,
        exclude_requester=policy.exclude_requester,
        when=policy.quorum_when,
        details=details,
    )


def eligible_ids(*, requester_id: int, quorum: Quorum) -> set[int]:
    """Everyone who may approve now: the active group members, and the requester unless excluded."""
    who = Q(groups=quorum.group_id) if quorum.group_id is not None else Q(pk__in=[])
    if not quorum.exclude_requester:
        who |= Q(pk=requester_id)
    found = get_user_model().objects.filter(who, is_active=True).values_list("pk", flat=True).distinct()
    ids = set(found)
    if quorum.exclude_requester:
        ids.discard(requester_id)
    return ids


def refusal_for(*, user_id: int, requester_id: int, quorum: Quorum) -> str:
    """Why this person may not vote now ("" when they may)."""
    if user_id == requester_id and quorum.exclude_requester:
        return REQUESTER_EXCLUDED
    return "" if user_id in eligible_ids(requester_id=requester_id, quorum=quorum) else NOT_AN_APPROVER


def counted_approvals(*, approval: ApprovalRequest, quorum: Quorum) -> list[ApprovalVote]:
    """The approve votes that count now: only those of people who are still eligible."""
    eligible = eligible_ids(requester_id=approval.user_id, quorum=quorum)
    votes = ApprovalVote.objects.filter(approval_id=approval.pk, decision=ApprovalVote.Decision.APPROVE)
    return [v for v in votes.order_by("decided_at", "id") if v.user_id in eligible]


def approver_entry(vote: ApprovalVote) -> dict[str, Any]:
    """One approver as the action token's ``approvers`` claim and the receipt name them."""
    auth = vote.auth or {}
    entry: dict[str, Any] = {
        "sub": f"user:{vote.user_id}",
        "time": int(vote.decided_at.timestamp()),
        "amr": list(auth.get("amr") or []),
    }
    if auth.get("auth_time"):
        entry["auth_time"] = int(auth["auth_time"])
    if auth.get("acr"):
        entry["acr"] = auth["acr"]
    return entry


def recipients(approval: ApprovalRequest, quorum: Quorum | None) -> list[int]:
    """Whose inboxes hear of this request: its user, and for a quorum everyone who may vote or did."""
    ids = {approval.user_id}
    if quorum is not None:
        ids |= eligible_ids(requester_id=approval.user_id, quorum=quorum)
        ids |= set(ApprovalVote.objects.filter(approval_id=approval.pk).values_list("user_id", flat=True))
    return sorted(ids)


def standing(*, approval: ApprovalRequest, quorum: Quorum, viewer_id: int) -> dict[str, Any]:
    """Where a quorum stands, for one person's inbox: how many approvals it needs and has, whether
    this person answered or may answer, and for whom the agent asks."""
    counted = counted_approvals(approval=approval, quorum=quorum)
    mine = (
        ApprovalVote.objects.filter(approval_id=approval.pk, user_id=viewer_id)
        .values_list("decision", flat=True)
        .first()
    )
    requester = (
        get_user_model().objects.filter(pk=approval.user_id).values_list("username", flat=True).first()
    )
    return {
        "needed": quorum.size,
        "approved": len(counted),
        "remaining": max(0, quorum.size - len(counted)),
        "voted": mine or "",
        "for_user": requester or "",
        "mine": viewer_id == approval.user_id,
        "can_vote": not mine
        and not refusal_for(user_id=viewer_id, requester_id=approval.user_id, quorum=quorum),
    }


def waiting_words(state: dict[str, Any]) -> str:
    """ "Waiting for 1 more approval", as the inbox shows it."""
    n = int(state["remaining"])
    return f"Waiting for {n} more approval{'s' if n != 1 else ''}"


def prompt_for(approval: ApprovalRequest, *, viewer_id: int, quorum: Quorum | None) -> dict[str, Any]:
    """The inbox payload of ``approval`` for one person, with where its quorum stands (if it has one)."""
    payload = prompt_payload(approval)
    if quorum is not None:
        state = standing(approval=approval, quorum=quorum, viewer_id=viewer_id)
        payload["quorum"] = {**state, "waiting": waiting_words(state)}
    return payload


def pending_for_approver(*, user_id: int) -> list[ApprovalRequest]:
    """Other people's pending requests this person may vote on now (or voted on), oldest first."""
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return []
    groups = list(user.groups.values_list("pk", flat=True))
    voted = set(
        ApprovalVote.objects.filter(
            user_id=user_id, approval__status=ApprovalRequest.Status.PENDING
        ).values_list("approval_id", flat=True)
    )
    if not groups and not voted:
        return []
    policies = {p.name: p for p in ScopePolicy.objects.filter(approver_group_id__in=groups)}
    found = (
        ApprovalRequest.objects.select_related("agent")
        .filter(
            Q(scope__in=list(policies)) | Q(pk__in=voted),
            status=ApprovalRequest.Status.PENDING,
            expires_at__gt=timezone.now(),
        )
        .exclude(user_id=user_id)
        .order_by("created")
    )
    mine = []
    for approval in found:
        policy = policies.get(approval.scope)
        if approval.pk in voted or (
            policy is not None and policy_quorum(policy, approval.authorization_details)
        ):
            mine.append(approval)
    return mine


def inbox_prompts(*, user_id: int) -> list[dict[str, Any]]:
    """Every prompt an inbox shows on (re)connect: the person's own, and those they may vote on."""
    own = (
        ApprovalRequest.objects.select_related("agent")
        .filter(user_id=user_id, status=ApprovalRequest.Status.PENDING, expires_at__gt=timezone.now())
        .order_by("created")
    )
    both = sorted([*own, *pending_for_approver(user_id=user_id)], key=lambda a: a.created)
    policies = (
        {p.name: p for p in ScopePolicy.objects.filter(name__in={a.scope for a in both})} if both else {}
    )
    return [prompt_for(a, viewer_id=user_id, quorum=_quorum_in(policies, a)) for a in both]


def _quorum_in(policies: dict[str, ScopePolicy], approval: ApprovalRequest) -> Quorum | None:
    policy = policies.get(approval.scope)
    return policy_quorum(policy, approval.authorization_details) if policy is not None else None


def quorums_for(approvals: list[ApprovalRequest]) -> dict[Any, Quorum | None]:
    """Each request's quorum (approval id -> quorum or None), in one statement."""
    policies = (
        {p.name: p for p in ScopePolicy.objects.filter(name__in={a.scope for a in approvals})}
        if approvals
        else {}
    )
    return {a.pk: _quorum_in(policies, a) for a in approvals}

"""Votes on a request a quorum decides (two-person approval, ``approvals.quorum``).

Each vote is one transaction: lock the grant, then the request (``FOR UPDATE``, the order every
decision and revocation takes), so the votes on one request run one after another; check under
that lock that the request is still PENDING in its window, that this person may vote now and has
not voted; write the vote and its audit row; then, if it is a denial, take the ``deny`` edge, or,
if the approvals of people still eligible reach the quorum, take the ``approve`` edge, both
through the one guarded UPDATE of ``approvals.services``. Otherwise the request stays PENDING (the
agent's polls answer ``authorization_pending``) and every approver's inbox hears the new standing.

A refusal raises before anything is written; the caller records it (``approval_vote_refused``).
"""

from datetime import datetime
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from audit.services import audit_record

from .errors import AlreadyVoted, ApprovalNotPending, NotAnApprover, RequesterExcluded, VoteRefused
from .models import ApprovalRequest, ApprovalVote
from .quorum import REQUESTER_EXCLUDED, approver_entry, counted_approvals, refusal_for
from .selectors import Decision
from .services import _after_commit, _audit, _decided, _lock_live_grant, _take_decision

Status = ApprovalRequest.Status
QUORUM = "quorum"
_VOTE = {"approve": ApprovalVote.Decision.APPROVE, "deny": ApprovalVote.Decision.DENY}


def approval_vote(
    *,
    decision: Decision,
    user: AbstractBaseUser,
    edge: str,
    auth: dict[str, Any],
    request: HttpRequest | None = None,
) -> ApprovalRequest:
    """One approver's Approve (``edge="approve"``) or Deny (``edge="deny"``) on a quorum request.

    ``auth`` is this person's own sign-in (``auth_time``, ``amr``, ``acr``), recorded with the vote.
    Raises ``ApprovalNotPending`` for a decided, expired or cancelled request, a ``VoteRefused``
    subclass for a person who may not vote (again).
    """
    approval, quorum = decision.approval, decision.quorum
    if quorum is None:  # a single decision is approvals.services._decide's
        raise ValueError("approval_vote needs a request whose policy asks for a quorum")
    now = timezone.now()
    with transaction.atomic():
        live = _lock_live_grant(approval, now)
        status, expires_at = (
            ApprovalRequest.objects.select_for_update()
            .filter(pk=approval.pk)
            .values_list("status", "expires_at")
            .get()
        )
        if not live or status != Status.PENDING or expires_at <= now:
            raise ApprovalNotPending(status)
        why = refusal_for(user_id=user.pk, requester_id=approval.user_id, quorum=quorum)
        if why == REQUESTER_EXCLUDED:
            raise RequesterExcluded("the policy asks someone other than the requester to approve")
        if why:
            raise NotAnApprover("you are not an approver for this request")
        if ApprovalVote.objects.filter(approval_id=approval.pk, user_id=user.pk).exists():
            raise AlreadyVoted("you answered this request already")
        vote = ApprovalVote.objects.create(
            approval_id=approval.pk, user_id=user.pk, decision=_VOTE[edge], decided_at=now, auth=auth
        )
        _audit(
            approval,
            "approval.vote",
            actor=f"user:{user.pk}",
            request=request,
            decision=vote.decision,
            auth=auth,
            quorum=quorum.size,
        )
        if edge == "deny":
            _finish(
                approval,
                edge="deny",
                user_id=user.pk,
                auth={"quorum": quorum.size, **auth},
                now=now,
                request=request,
            )
            return approval
        counted = counted_approvals(approval=approval, quorum=quorum)
        if len(counted) >= quorum.size:
            approvers = [approver_entry(v) for v in counted]
            _finish(
                approval,
                edge="approve",
                user_id=user.pk,
                auth={"quorum": quorum.size, "approvers": approvers},
                now=now,
                request=request,
            )
            return approval
        # Still PENDING: every approver's inbox shows the new standing ("Waiting for 1 more approval").
        _after_commit("approvals.deliver_prompt", approval.pk)
    return approval


def _finish(
    approval: ApprovalRequest,
    *,
    edge: str,
    user_id: int,
    auth: dict[str, Any],
    now: datetime,
    request: HttpRequest | None,
) -> None:
    if not _take_decision(
        approval, edge=edge, user_id=user_id, method=QUORUM, auth=auth, now=now, owner_id=None
    ):
        # Under the request's lock nothing else moved it; an agent suspended meanwhile matches nothing.
        raise ApprovalNotPending(
            ApprovalRequest.objects.filter(pk=approval.pk).values_list("status", flat=True).first()
        )
    approval.decided_at, approval.decision_method, approval.decision_auth = now, QUORUM, auth
    _decided(approval, edge=edge, user_id=user_id, method=QUORUM, auth=auth, request=request)


def approval_vote_refused(
    *,
    approval: ApprovalRequest,
    user: AbstractBaseUser,
    refusal: VoteRefused,
    request: HttpRequest | None = None,
) -> None:
    """The one audit row of a refused vote (nothing else was written)."""
    audit_record(
        event="approval.vote_refused",
        outcome="refused",
        error=refusal.error,
        actor=f"user:{user.pk}",
        user_id=user.pk,
        client_id=approval.agent.client_id,
        grant_id=approval.grant_id,
        request=request,
        detail={"approval_id": str(approval.pk), "scope": approval.scope, "reason": refusal.reason_code},
    )

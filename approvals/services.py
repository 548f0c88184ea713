"""Every approval state transition, each one guarded and atomic.

The conditional UPDATE's row count decides every race (two approves, approve
against deny, two collectors, two redeemers): never read-then-write. Celery
tasks and websocket pushes are queued on commit and only carry news of the
row, which stays the source of truth.
"""

import hashlib
import hmac
import time
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone

from audit.services import PendingEvent, audit_event, audit_record
from consent import rows
from consent.budget import Budget
from consent.conf import countersign_settings
from consent.errors import InstanceMismatch, InvalidClient
from consent.instances import refuse_cut_off
from consent.models import Agent, AgentInstance, ResourceServer, ScopePolicy, SessionGrant
from consent.oauth.attestation import InstanceProof
from consent.rules import rule_matches
from consent.services import AuthContext, grant_extend
from consent.tokens import bind_to_proof_key, token_checksum, token_type

from . import delivery, rar
from .budgets import BUDGET, budget_approved_event, budget_fit, budget_refund, budget_reserve
from .ciba import EXTEND_SCOPE, BackchannelRequest
from .errors import (
    AlreadyIssued,
    ApprovalNotFound,
    ApprovalNotPending,
    AuthorizationPending,
    DeniedByUser,
    RequestCancelled,
    SlowDown,
    TooManyPending,
    UnknownAuthReqId,
    WindowPassed,
)
from .models import ActionToken, ApprovalRequest
from .quorum import quorum_for
from .selectors import Decision, approval_for_decision
from .tokens import action_claims, mint

Status = ApprovalRequest.Status
AUTO_RULE = "auto_rule"
GRANT_ENDED = "grant_ended"


def auth_req_id_for(approval_id: Any) -> str:
    """CIBA §7.3 ``auth_req_id``: 256 bits, derived so an identical request can be answered again.

    Only its SHA-256 is stored; deriving it needs the server's secret key.
    """
    mac = hmac.new(settings.SECRET_KEY.encode(), f"auth_req_id:{approval_id}".encode(), hashlib.sha256)
    return mac.hexdigest()


def auth_req_id_hash(auth_req_id: str) -> str:
    return hashlib.sha256(auth_req_id.encode()).hexdigest()


def _after_commit(task: str, approval_id: Any, **options: Any) -> None:
    """Queue the task registered as ``task`` (``approvals.tasks``) once the transaction commits.

    Looked up by name in the Celery app's registry: the tasks carry news of what the services
    wrote (and call back into them), so the services name them rather than import them.
    """
    queued = current_app.tasks[task]  # now, not on commit: a name nothing registered fails loudly
    # robust: with the broker down, the committed request still answers; the row is the truth, and
    # the redelivery sweep and the inbox's replay on (re)connect bring the news once Redis is back.
    transaction.on_commit(lambda: queued.apply_async((str(approval_id),), **options), robust=True)


def _deliver_after_commit(approval: ApprovalRequest, *, push_here: bool) -> None:
    """Once the transaction commits, bring the new prompt to the user's open inboxes.

    With ``push_here`` (the user alone decides, so the prompt is the same for every inbox) this
    process pushes it first (``delivery.push_now``: two Redis round trips), then queues
    ``approvals.deliver_prompt`` told so: the task records the delivery and fans out to the
    other channels as always, and pushes only if this push did not happen. The
    prompt reaches the tab without waiting for a worker to pick the task up; the task stays the
    guarantee (retries, the redelivery sweep), and each inbox is sent the prompt once.
    """
    queued = current_app.tasks["approvals.deliver_prompt"]

    def deliver() -> None:
        pushed, pushed_at = False, 0.0
        try:
            if push_here:
                message = {"type": "approval.upsert", "prompt": delivery.prompt_payload(approval)}
                pushed_at = time.time()
                pushed = delivery.push_now(approval.user_id, message)
        finally:  # queued whatever the push did: the task is what records and retries
            queued.apply_async(
                (str(approval.pk),), kwargs={"pushed": True, "pushed_at": pushed_at} if pushed else None
            )

    transaction.on_commit(deliver, robust=True)


def _push_removal_after_commit(approval_id: Any, *, user_id: Any, status: str) -> None:
    """Once the transaction commits, tell the user's open inboxes the prompt left the pending list.

    Sent from this process (``delivery.push_now``); only if that fails does the news go through
    the ``approvals.push_removal`` task, which re-reads the row and retries until Redis answers.
    """
    fallback = current_app.tasks["approvals.push_removal"]
    message = delivery.removal_message(approval_id, status)

    def push() -> None:
        if not delivery.push_now(user_id, message):
            fallback.apply_async((str(approval_id),))

    transaction.on_commit(push, robust=True)


def _announce_end(approval: ApprovalRequest, *, approvers: bool | None = None) -> None:
    """Tell open inboxes the prompt is gone and, in ping mode, tell the agent to collect.

    ``approvers``: whether other people's inboxes show it too (two-person approval), when the
    caller knows; None reads the scope's quorum. Those go through ``approvals.push_removal``, which
    tells every approver; a prompt only its user sees is pushed from here.
    """
    if approvers is None:
        approvers = quorum_for(scope=approval.scope, details=approval.authorization_details) is not None
    if approvers:
        _after_commit("approvals.push_removal", approval.pk)
    else:
        _push_removal_after_commit(approval.pk, user_id=approval.user_id, status=approval.status)
    if approval.delivery_mode == ApprovalRequest.DeliveryMode.PING:
        _after_commit("approvals.notify_agent", approval.pk)


def _event(
    approval: ApprovalRequest,
    event: str,
    *,
    actor: str,
    outcome: str = "ok",
    error: str = "",
    request: HttpRequest | None = None,
    **detail: Any,
) -> PendingEvent:
    return audit_event(
        event=event,
        outcome=outcome,
        error=error,
        actor=actor,
        user_id=approval.user_id,
        client_id=approval.agent.client_id,
        grant_id=approval.grant_id,
        request=request,
        detail={
            "approval_id": str(approval.pk),
            "scope": approval.scope,
            **({"instance": approval.instance} if approval.instance else {}),
            **detail,
        },
    )


def _audit(approval: ApprovalRequest, event: str, **kwargs: Any) -> None:
    _event(approval, event, **kwargs).append()


# --- creation ---------------------------------------------------------------------------------


_APPROVAL = rows.table(ApprovalRequest)


def _leaving(edge: str, column: str = "status") -> tuple[str, list[str]]:
    """The guard of ``edge`` (``ApprovalRequest.EDGES``) for a conditional UPDATE: SQL and parameters."""
    states = ApprovalRequest.leaving(edge)
    return f"{column} IN ({', '.join(['%s'] * len(states))})", list(states)


def _pending_state(req: BackchannelRequest, now: datetime) -> tuple[Any, bool, int, int, int, int]:
    """One statement: the pending request for this very action (if any) and whether its window has
    passed; how many prompts wait for this user and for this agent; and how many prompts were
    created for this user and by this agent within ``PROMPT_WINDOW_SECONDS`` (approval fatigue caps:
    the second pair counts prompts that ended too, so short-lived prompts cannot slip past)."""
    at = rows.param(ApprovalRequest, "expires_at", now)
    since = rows.param(
        ApprovalRequest, "created", now - timedelta(seconds=countersign_settings.PROMPT_WINDOW_SECONDS)
    )
    grant_id = rows.param(ApprovalRequest, "grant", req.grant.pk)
    same = f"FROM {_APPROVAL} WHERE grant_id = %s AND scope = %s AND action_hash = %s AND status = %s"
    recent = "AND created > %s AND decision_method NOT IN (%s, %s)"  # approvals without a prompt don't count
    row = rows.fetchone(
        f"SELECT (SELECT id {same}), (SELECT CASE WHEN expires_at <= %s THEN 1 ELSE 0 END {same}),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE user_id = %s AND status = %s AND expires_at > %s),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE agent_id = %s AND status = %s AND expires_at > %s),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE user_id = %s {recent}),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE agent_id = %s {recent})",
        [
            grant_id,
            req.scope,
            req.action_hash,
            Status.PENDING,
            at,
            grant_id,
            req.scope,
            req.action_hash,
            Status.PENDING,
            req.grant.user_id,
            Status.PENDING,
            at,
            req.agent.pk,
            Status.PENDING,
            at,
            req.grant.user_id,
            since,
            AUTO_RULE,
            BUDGET,
            req.agent.pk,
            since,
            AUTO_RULE,
            BUDGET,
        ],
    )
    assert row is not None  # a SELECT of scalar subqueries: always one row
    return row[0], bool(row[1]), row[2], row[3], row[4], row[5]


def _existing(req: BackchannelRequest) -> ApprovalRequest:
    return ApprovalRequest.objects.select_related("agent").get(
        grant=req.grant, scope=req.scope, action_hash=req.action_hash, status=Status.PENDING
    )


def approval_request_create(
    *, req: BackchannelRequest, request: HttpRequest | None = None, opened_by: ResourceServer | None = None
) -> tuple[ApprovalRequest, bool]:
    """Persist a validated CIBA request. Returns (approval, created).

    An identical pending request (same grant, scope and action hash) is returned
    as it is: the user sees one prompt, the agent gets the same ``auth_req_id``.
    ``opened_by``: the resource server that opened it for a token it was handed.
    """
    now = timezone.now()
    existing_id, stale, user_pending, agent_pending, user_recent, agent_recent = _pending_state(req, now)
    if existing_id is not None and stale:
        approval_expire(approval_id=existing_id)  # audited and removed from inboxes like any expiry
        existing_id = None
    if existing_id is not None:
        return _existing(req), False
    if user_pending >= countersign_settings.MAX_PENDING_PER_USER:
        raise TooManyPending("the user already has too many approvals waiting; try again later")
    if agent_pending >= countersign_settings.MAX_PENDING_PER_AGENT:
        raise TooManyPending("this agent already has too many approvals waiting; try again later")
    if user_recent >= countersign_settings.MAX_PROMPTS_PER_USER_IN_WINDOW:
        raise TooManyPending("the user was asked too often recently; try again later")
    if agent_recent >= countersign_settings.MAX_PROMPTS_PER_AGENT_IN_WINDOW:
        raise TooManyPending("this agent asked too often recently; try again later")
    grant = req.grant
    approval = ApprovalRequest(
        grant=grant,
        user_id=grant.user_id,
        agent=req.agent,
        scope=req.scope,
        authorization_details=req.authorization_details,
        action_hash=req.action_hash,
        headline=rar.headline(req.authorization_details, system=req.system),
        binding_message=req.binding_message,
        delivery_mode=req.delivery_mode,
        client_notification_token=req.client_notification_token,
        interval=countersign_settings.CIBA_INTERVAL,
        created=now,
        # A prompt never outlives its grant: when the grant ends, the prompt's own on-time expiry
        # ends it at that very moment (approval_expire cancels it), and every read that checks
        # expires_at (inbox, caps, polls) stops counting it without waiting for a sweep.
        expires_at=min(now + timedelta(seconds=req.window_seconds), grant.expires_at),
        opened_by=opened_by,
        instance=req.instance,
    )
    approval.auth_req_id_hash = auth_req_id_hash(auth_req_id_for(approval.pk))
    rule = req.auto_approve_rule
    auto = bool(rule) and rule_matches(rule, req.authorization_details)
    budget = (
        req.budget
        if req.budget_read
        else Budget.objects.filter(grant_id=grant.pk, scope=req.scope, status=Budget.Status.ACTIVE).first()
    )
    # A request a quorum covers is never approved by a rule or a budget alone. The policy's quorum
    # is read only where one of them could approve (one statement), not on every request.
    needs_quorum = (auto or budget is not None) and (
        req.quorum if req.quorum_read else quorum_for(scope=req.scope, details=req.authorization_details)
    ) is not None
    if needs_quorum:
        auto = False
    fit = None if auto or needs_quorum else budget_fit(budget, req.authorization_details, now)
    if fit is not None and fit.amount is None:
        approval.budget_note = fit.why[:200]
    requested = _event(
        approval,
        "approval.requested",
        actor=f"rs:{opened_by.client_id}" if opened_by else req.agent.actor_id,
        request=request,
        action_hash=approval.action_hash,
        headline=approval.headline,
        mode=approval.delivery_mode,
        expires_in=req.window_seconds,
        **({"budget": approval.budget_note} if approval.budget_note else {}),
    )
    reserving = not auto and budget is not None and fit is not None and fit.amount is not None
    if not auto and not reserving:
        # A prompt: the row and its audit event in one statement (no BEGIN and COMMIT around them).
        if (
            rows.insert_with_event(
                ApprovalRequest, rows.instance_values(approval), requested, skip_conflicts=True
            )
            is None
        ):
            return _existing(req), False  # a concurrent identical request won the partial unique index
        approval._state.adding = False
        # One message per request: the delivery task schedules the on-time expiry
        # (approval_mark_delivered); the expiry sweep covers a prompt never delivered.
        _deliver_after_commit(approval, push_here=req.quorum_read and req.quorum is None)
        return approval, True
    with transaction.atomic():  # the row and its audit events commit together, or not at all
        if rows.insert_instance(approval, skip_conflicts=True) is None:
            # A concurrent identical request won the partial unique index: answer with that one.
            return _existing(req), False
        approval._state.adding = False
        requested.append()
        if reserving:
            assert budget is not None and fit is not None and fit.amount is not None
            # Inside the user's budget: reserved by one conditional UPDATE; the request then takes the
            # approve edge as a rule's does. Lost to a concurrent reservation (or a lowering): a prompt.
            if budget_reserve(budget=budget, approval=approval, amount=fit.amount, now=now):
                _auto_approve(
                    approval,
                    rule="",
                    now=now,
                    method=BUDGET,
                    decision_auth={
                        "budget_id": budget.pk,
                        "amount": str(fit.amount),
                        "currency": budget.currency,
                    },
                )
                budget_approved_event(approval, budget=budget, amount=fit.amount).append()
                auto = True
            else:  # words the prompt from the budget as the winner left it
                lost = budget_fit(Budget.objects.filter(pk=budget.pk).first(), req.authorization_details, now)
                approval.budget_note = (
                    lost.why if lost is not None and lost.why else "your budget no longer covers it"
                )
                ApprovalRequest.objects.filter(pk=approval.pk).update(budget_note=approval.budget_note[:200])
        else:
            _auto_approve(approval, rule=rule, now=now)
            _audit(approval, "approval.auto_approved", actor="system", rule=rule)
        if auto:
            if approval.delivery_mode == ApprovalRequest.DeliveryMode.PING:
                _after_commit("approvals.notify_agent", approval.pk)
        else:  # the budget no longer covered it (lost to a concurrent reservation): a prompt after all
            _deliver_after_commit(approval, push_here=req.quorum_read and req.quorum is None)
    return approval, True


def _auto_approve(
    approval: ApprovalRequest,
    *,
    rule: str,
    now: datetime,
    method: str = AUTO_RULE,
    decision_auth: dict[str, Any] | None = None,
) -> None:
    """PENDING -> APPROVED by the policy's rule (or within the user's budget, ``method`` BUDGET), in
    the transaction that created the request: the same edge, and the same guard, as the user's Approve."""
    guard, states = _leaving("approve")
    decision_auth = decision_auth if decision_auth is not None else {"rule": rule}
    moved = rows.execute(
        f"UPDATE {_APPROVAL} SET status = %s, decided_at = %s, decision_method = %s, decision_auth = %s"
        f" WHERE id = %s AND {guard}",
        [
            ApprovalRequest.entering("approve"),
            rows.param(ApprovalRequest, "decided_at", now),
            method,
            rows.param(ApprovalRequest, "decision_auth", decision_auth),
            rows.param(ApprovalRequest, "id", approval.pk),
            *states,
        ],
    )
    if moved != 1:  # the row was inserted in this very transaction: nothing else can have moved it
        raise ApprovalNotPending(approval.status)
    approval.status, approval.decided_at = ApprovalRequest.entering("approve"), now
    approval.decision_method, approval.decision_auth = method, decision_auth


def approval_mark_delivered(*, approval: ApprovalRequest, channel: str, at: datetime | None = None) -> bool:
    """The prompt reached the user's open inboxes (``at``, default now): record the first delivery
    (audited). Safe to call again: only the first call records anything.

    The window's end needs no task of its own: every read checks ``expires_at`` (the inbox, the
    caps, a poll answers ``expired_token``), and the sweep (``approvals.expire_due``, every
    ``APPROVAL_SWEEP_SECONDS``) moves the row to EXPIRED and tells open inboxes. A task per
    prompt held until its window ends cost a worker as much as the delivery itself.
    """
    if approval.delivered_at is not None:  # a redelivery: recorded already
        return False
    # One statement on PostgreSQL: the first delivery takes the row once, its audit row with it.
    batch = rows.Batch(
        rows.guarded_update(
            ApprovalRequest, approval.pk, {"delivered_at": at or timezone.now()}, "delivered_at IS NULL"
        )
    )
    batch.event("delivered", _event(approval, "approval.delivered", actor="system", channel=channel))
    return batch.run() is not None


# --- the user's decision ----------------------------------------------------------------------


_GRANT_LIVE = rows.Columns(SessionGrant, "g", ["status", "expires_at"])
_AGENT_ACTIVE = f"SELECT id FROM {rows.table(Agent)} WHERE status = %s"


def _decide(
    *,
    approval_id: Any,
    user: User,
    edge: str,
    method: str,
    auth: dict[str, Any],
    request: HttpRequest | None = None,
    decision: Decision | None = None,
) -> ApprovalRequest:
    """The ``approve`` or ``deny`` edge, decided by one conditional UPDATE under the grant's lock.

    ``decision`` is the request as ``selectors.approval_for_decision`` read it for this person (the
    inbox view has it already); only its fixed fields (grant, agent, scope, details) and the
    policy's quorum are used. A request a quorum decides takes a vote instead (``approvals.votes``).
    """
    if decision is None:
        decision = approval_for_decision(approval_id=approval_id, user_id=user.pk)
        if decision is None:
            raise ApprovalNotFound(str(approval_id))
    if decision.quorum is not None:
        from .votes import approval_vote  # the votes take the edges below: imported where used

        return approval_vote(decision=decision, user=user, edge=edge, auth=auth, request=request)
    approval = decision.approval
    if approval.user_id != user.pk:
        raise ApprovalNotFound(str(approval_id))
    now = timezone.now()
    if approval.scope != EXTEND_SCOPE:  # an extension also changes the grant: the transaction below
        return _decide_in_one_statement(
            approval, edge=edge, user_id=user.pk, method=method, auth=auth, request=request, now=now
        )
    with transaction.atomic():
        decided = _lock_live_grant(approval, now) and _take_decision(
            approval, edge=edge, user_id=user.pk, method=method, auth=auth, now=now, owner_id=user.pk
        )
        if not decided:
            raise ApprovalNotPending(
                ApprovalRequest.objects.filter(pk=approval.pk).values_list("status", flat=True).first()
            )
        _decided(approval, edge=edge, user_id=user.pk, method=method, auth=auth, request=request)
    return approval


def _decide_in_one_statement(
    approval: ApprovalRequest,
    *,
    edge: str,
    user_id: int,
    method: str,
    auth: dict[str, Any],
    request: HttpRequest | None,
    now: datetime,
) -> ApprovalRequest:
    """``_lock_live_grant``, ``_take_decision`` and ``_decided`` as one statement (``rows.Batch``).

    The conditional UPDATE of the request is the guard, with the same conditions, and the audit
    row lands with it or not at all; no BEGIN/COMMIT of its own. Its condition on the grant locks
    the grant row (FOR UPDATE) while the request's row is qualified, before that row is locked
    for the update, so the grant is still locked before its approval, the order grant_revoke
    takes; a request the revocation cancelled meanwhile fails the re-checked status.
    """
    to = ApprovalRequest.entering(edge)
    update = _decision_update(
        approval,
        edge=edge,
        user_id=user_id,
        method=method,
        auth=auth,
        now=now,
        owner_id=user_id,
        grant_live=True,
    )
    batch = rows.Batch(update)
    batch.event(
        "audit", _decision_event(approval, to=to, user_id=user_id, method=method, auth=auth, request=request)
    )
    if batch.run() is None:
        raise ApprovalNotPending(
            ApprovalRequest.objects.filter(pk=approval.pk).values_list("status", flat=True).first()
        )
    approval.status = to
    _announce_end(approval, approvers="quorum" in auth)
    return approval


def _lock_live_grant(approval: ApprovalRequest, now: datetime) -> bool:
    """Lock the request's grant (FOR UPDATE) and say whether it is live.

    Locks in one global order, the grant before its approval, as grant_revoke takes them (it
    cancels the grant's approvals with the grant locked); approving an extension updates the
    grant, so locking the approval first could deadlock with a revocation. FOR UPDATE, as
    grant_extend takes it: no lock upgrade later in this transaction.
    """
    row = rows.fetchone(
        f"SELECT {_GRANT_LIVE.sql} FROM {rows.table(SessionGrant)} g WHERE g.id = %s" + rows.for_update("g"),
        [rows.param(SessionGrant, "id", approval.grant_id)],
    )
    grant = _GRANT_LIVE.load(row) if row is not None else None
    return grant is not None and grant["status"] == SessionGrant.Status.ACTIVE and grant["expires_at"] > now


def _take_decision(
    approval: ApprovalRequest,
    *,
    edge: str,
    user_id: int,
    method: str,
    auth: dict[str, Any],
    now: datetime,
    owner_id: int | None,
) -> bool:
    """The ``approve`` or ``deny`` edge as one conditional UPDATE; True if this call took it.

    The row count decides: the UPDATE re-checks the request's own status and window on the row it
    locks (a concurrent decision, expiry or cancellation makes it match nothing). ``owner_id``:
    only that user's request (a single decision); None for a quorum, whose votes checked who.
    """
    update = _decision_update(
        approval,
        edge=edge,
        user_id=user_id,
        method=method,
        auth=auth,
        now=now,
        owner_id=owner_id,
        grant_live=False,
    )
    return rows.fetchone(*update) is not None  # RETURNING 1: a row when this call took the edge


def _decision_update(
    approval: ApprovalRequest,
    *,
    edge: str,
    user_id: int,
    method: str,
    auth: dict[str, Any],
    now: datetime,
    owner_id: int | None,
    grant_live: bool,
) -> tuple[str, list[Any]]:
    """The conditional UPDATE of ``edge``: the request's status and window, its agent still active,
    ``owner_id``'s request (None: a quorum's), and with ``grant_live`` its grant live, locked FOR
    UPDATE by the condition itself."""
    guard, states = _leaving(edge)
    where, params = (
        [guard, "expires_at > %s", f"agent_id IN ({_AGENT_ACTIVE})"],
        [
            *states,
            rows.param(ApprovalRequest, "expires_at", now),
            Agent.Status.ACTIVE,
        ],
    )
    if owner_id is not None:
        where.insert(0, "user_id = %s")
        params.insert(0, owner_id)
    if grant_live:
        where.append(
            f"grant_id IN (SELECT g.id FROM {rows.table(SessionGrant)} g WHERE g.id = %s AND g.status = %s"
            f" AND g.expires_at > %s{rows.for_update('g')})"
        )
        params += [
            rows.param(SessionGrant, "id", approval.grant_id),
            SessionGrant.Status.ACTIVE,
            rows.param(SessionGrant, "expires_at", now),
        ]
    return rows.guarded_update(
        ApprovalRequest,
        approval.pk,
        {
            "status": ApprovalRequest.entering(edge),
            "decided_at": now,
            "decided_by": user_id,
            "decision_method": method,
            "decision_auth": auth,
        },
        " AND ".join(where),
        params,
    )


def _decided(
    approval: ApprovalRequest, *, edge: str, user_id: int, method: str, auth: dict[str, Any], request: Any
) -> None:
    """What follows a decision, in its transaction: a grant extension, the audit row, the news."""
    to = ApprovalRequest.entering(edge)
    approval.status = to
    if to == Status.APPROVED and approval.scope == EXTEND_SCOPE:
        grant_extend(
            grant_id=approval.grant_id,
            seconds=approval.authorization_details[0]["seconds"],
            actor=f"user:{user_id}",
            approval_id=approval.pk,
        )
    _decision_event(approval, to=to, user_id=user_id, method=method, auth=auth, request=request).append()
    _announce_end(approval, approvers="quorum" in auth)


def _decision_event(
    approval: ApprovalRequest, *, to: str, user_id: int, method: str, auth: dict[str, Any], request: Any
) -> PendingEvent:
    """The audit event of a decision that moved ``approval`` to ``to``."""
    return _event(
        approval,
        "approval.approved" if to == Status.APPROVED else "approval.denied",
        actor=f"user:{user_id}",
        request=request,
        method=method,
        auth=auth,
    )


def _auth_dict(auth: AuthContext) -> dict[str, Any]:
    return {"auth_time": int(auth.auth_time.timestamp()), "amr": list(auth.amr), "acr": auth.acr}


def approval_approve(
    *,
    approval_id: Any,
    user: User,
    auth: AuthContext,
    request: HttpRequest | None = None,
    decision: Decision | None = None,
) -> ApprovalRequest:
    return _decide(
        approval_id=approval_id,
        user=user,
        edge="approve",
        method="browser",
        auth=_auth_dict(auth),
        request=request,
        decision=decision,
    )


def approval_deny(
    *,
    approval_id: Any,
    user: User,
    auth: AuthContext,
    request: HttpRequest | None = None,
    decision: Decision | None = None,
) -> ApprovalRequest:
    return _decide(
        approval_id=approval_id,
        user=user,
        edge="deny",
        method="browser",
        auth=_auth_dict(auth),
        request=request,
        decision=decision,
    )


def approval_audit_refused_decision(
    *, approval_id: Any, user: User, reason: str, request: HttpRequest | None = None
) -> None:
    audit_record(
        event="approval.decision_refused",
        outcome="refused",
        error="not_pending",
        actor=f"user:{user.pk}",
        user_id=user.pk,
        request=request,
        detail={"approval_id": str(approval_id), "reason": reason},
    )


# --- the agent collects its token (CIBA token request, §10.1) --------------------------------


_COLLECT = rows.Columns(
    ApprovalRequest,
    "ap",
    [
        "id",
        "status",
        "expires_at",
        "interval",
        "last_polled_at",
        "agent",
        "grant",
        "user",
        "scope",
        "authorization_details",
        "action_hash",
        "decision_auth",
        "decision_method",
        "delivery_mode",
        "opened_by",
        "decided_at",
        "instance",
    ],
)
_COLLECT_GRANT = rows.Columns(SessionGrant, "g", ["id", "status", "expires_at", "dpop_jkt", "user"])
_COLLECT_INSTANCE = rows.Columns(AgentInstance, "i", ["status", "jkt"])
_COLLECT_POLICY = rows.Columns(ScopePolicy, "p", ["id", "audience", "action_token_ttl"])
_INTERVAL = connection.ops.quote_name("interval")


def _read_for_collect(auth_req_id: str) -> tuple[ApprovalRequest, dict[str, Any]] | None:
    """One statement: the request behind an ``auth_req_id``, its grant, its scope's policy, and the
    state of the agent instance that asked (``policy["instance"]``; NULLs for an agent as one)."""
    row = rows.fetchone(
        f"SELECT {_COLLECT.sql}, {_COLLECT_GRANT.sql}, {_COLLECT_POLICY.sql}, {_COLLECT_INSTANCE.sql}"
        f" FROM {_APPROVAL} ap JOIN {rows.table(SessionGrant)} g ON g.id = ap.grant_id"
        f" LEFT JOIN {rows.table(ScopePolicy)} p ON p.name = ap.scope"
        f" LEFT JOIN {rows.table(AgentInstance)} i ON i.grant_id = ap.grant_id AND i.instance_id = ap.instance"
        f" WHERE ap.auth_req_id_hash = %s",
        [auth_req_id_hash(auth_req_id or "")],
    )
    if row is None:
        return None
    values, grant, policy, instance = rows.split(
        row, _COLLECT, _COLLECT_GRANT, _COLLECT_POLICY, _COLLECT_INSTANCE
    )
    approval = rows.instance(ApprovalRequest, values)
    approval.grant = rows.instance(SessionGrant, grant)
    return approval, {**policy, "instance": instance}


def _check_collector_instance(
    approval: ApprovalRequest, instance: dict[str, Any], proof: InstanceProof | None
) -> None:
    """Only the instance that asked collects, while it is not cut off, with the key it first proved."""
    asking = proof.instance if proof is not None else ""
    if approval.instance != asking:
        raise InstanceMismatch(
            "This auth_req_id belongs to another instance of the agent.",
            reason=f"auth_req_id of instance {approval.instance!r} polled by {asking!r}",
        )
    if proof is None:
        return
    if instance["status"] == AgentInstance.Status.CUT_OFF:
        raise refuse_cut_off(
            agent=approval.agent,
            grant_id=approval.grant_id,
            user_id=approval.user_id,
            instance=approval.instance,
            where="ciba_collect",
        )
    if instance["jkt"] != proof.jkt:
        raise InvalidClient(reason=f"instance {proof.instance} proved another key than on its first use")


def approval_collect(
    *,
    auth_req_id: str,
    agent: Agent | None = None,
    jkt: str = "",
    resource_server: ResourceServer | None = None,
    instance: InstanceProof | None = None,
) -> dict[str, Any]:
    """Answer one CIBA poll. Raises the CIBA §11 error for every non-success.

    ``jkt`` is the thumbprint of the poll's DPoP proof key, "" without one (RFC 9449 §6.1).
    The collector is the agent, or, for a request a resource server opened
    (``approvals.rs_stepup``), that resource server and no one else; for a request an agent
    instance made (``instance``: the poller's proof), that instance alone.
    """
    now = timezone.now()
    found = _read_for_collect(auth_req_id)
    if found is None or not (
        found[0].opened_by_id == resource_server.pk
        if resource_server is not None
        else agent is not None and found[0].agent_id == agent.pk and found[0].opened_by_id is None
    ):
        raise UnknownAuthReqId("unknown auth_req_id")
    approval, policy = found
    approval.agent = agent if agent is not None else Agent.objects.get(pk=approval.agent_id)
    if resource_server is not None:
        approval.opened_by = resource_server
    else:
        _check_collector_instance(approval, policy["instance"], instance)
    if approval.status == Status.PENDING:
        if not approval.grant.is_live(now):
            # Checked on read as well: a grant that ended answers no more polls with "pending".
            approval_cancel(approval_id=approval.pk, reason=GRANT_ENDED)
            raise RequestCancelled("the session grant has ended")
        if approval.expires_at <= now:
            approval_expire(approval_id=approval.pk)
            raise WindowPassed("the approval window has passed")
        at = rows.param(ApprovalRequest, "last_polled_at", now)
        too_soon = rows.param(ApprovalRequest, "last_polled_at", now - timedelta(seconds=approval.interval))
        pk = rows.param(ApprovalRequest, "id", approval.pk)
        polled = rows.execute(
            f"UPDATE {_APPROVAL} SET last_polled_at = %s WHERE id = %s AND status = %s"
            f" AND (last_polled_at IS NULL OR last_polled_at <= %s)",
            [at, pk, Status.PENDING, too_soon],
        )
        if polled == 1:
            raise AuthorizationPending("the user has not answered yet")
        rows.execute(
            f"UPDATE {_APPROVAL} SET {_INTERVAL} = %s, last_polled_at = %s WHERE id = %s",
            [approval.interval + 5, at, pk],
        )
        raise SlowDown(f"poll at most every {approval.interval + 5} seconds")
    if approval.status == Status.DENIED:
        raise DeniedByUser("the user denied this action")
    if approval.status == Status.EXPIRED:
        raise WindowPassed("the approval window has passed")
    if approval.status == Status.CANCELLED:
        raise RequestCancelled(f"the request was cancelled ({approval.decision_method})")
    if approval.status != Status.APPROVED:
        raise AlreadyIssued("the token for this auth_req_id was already issued")
    return _issue(approval, policy, now, jkt)


def _issue(approval: ApprovalRequest, policy: dict[str, Any], now: datetime, jkt: str) -> dict[str, Any]:
    if not approval.grant.is_live(now) or approval.agent.status != Agent.Status.ACTIVE:
        approval_cancel(approval_id=approval.pk, reason=GRANT_ENDED)
        raise RequestCancelled("the session grant or the agent is no longer active")
    known = policy["id"] is not None
    # A grant extension has no downstream system: its token is addressed to us, as a receipt.
    audience = policy["audience"] if known else countersign_settings.ISSUER
    ttl = policy["action_token_ttl"] if known else countersign_settings.DEFAULT_ACTION_TOKEN_TTL
    claims = action_claims(approval=approval, audience=audience, ttl=ttl)
    if approval.opened_by_id is None:  # a resource server's own token is for itself: no agent key binds it
        claims = bind_to_proof_key(claims, jkt=jkt, grant_jkt=approval.grant.dpop_jkt)
    # APPROVED -> ISSUED decides who collects; the action token and its audit row land with it, in one
    # statement. ISSUED -> EXPIRED once the token lapses unredeemed is the expiry sweep's (redemption
    # refuses an expired token by itself), so collecting queues nothing.
    batch = rows.Batch(
        rows.guarded_update(
            ApprovalRequest,
            approval.pk,
            {"status": ApprovalRequest.entering("collect")},
            *_leaving("collect"),
        )
    )
    # Minted first: the row records the token's digest, which redemption checks instead of its signature.
    action_token = mint(claims)
    batch.insert(
        "token",
        ActionToken,
        {
            "jti": claims["jti"],
            "token_checksum": token_checksum(action_token),
            "approval": approval.pk,
            "issued_at": now,
            "expires_at": now + timedelta(seconds=ttl),
            "redeemed_at": None,
            "redeemed_by": None,
        },
    )
    collector = f"rs:{approval.opened_by.client_id}" if approval.opened_by else approval.agent.actor_id
    batch.event(
        "audit", _event(approval, "action_token.issued", actor=collector, jti=claims["jti"], expires_in=ttl)
    )
    if batch.run() is None:
        raise AlreadyIssued("the token for this auth_req_id was already issued")
    response = {
        "access_token": action_token,
        "token_type": token_type(jkt),
        "expires_in": ttl,
        "scope": approval.scope,
        "authorization_details": approval.authorization_details,
    }
    if approval.scope == EXTEND_SCOPE:
        response["grant_expires_at"] = int(
            SessionGrant.objects.get(pk=approval.grant_id).expires_at.timestamp()
        )
    return response


# --- endings without a user decision ----------------------------------------------------------


def approval_expire(*, approval_id: Any) -> bool:
    """PENDING past its window, or ISSUED with its action token expired unredeemed -> EXPIRED.

    A PENDING prompt whose grant has ended (its window is capped at the grant's end) is CANCELLED
    instead, as revocation cancels them: the user never gets to answer it.
    """
    now = timezone.now()
    with transaction.atomic():
        approval = (
            ApprovalRequest.objects.select_for_update(of=("self",))
            .select_related("agent", "grant")
            .filter(pk=approval_id)
            .first()
        )
        if approval is None:
            return False
        token = ActionToken.objects.filter(approval_id=approval.pk).first()
        due = (approval.status == Status.PENDING and approval.expires_at <= now) or (
            approval.status == Status.ISSUED
            and token is not None
            and token.redeemed_at is None
            and token.expires_at <= now
        )
        if not due:
            return False
        if approval.status == Status.PENDING and not approval.grant.is_live(now):
            edge, method, event = "cancel", GRANT_ENDED, "approval.cancelled"
        else:
            edge, method, event = "expire", "timeout", "approval.expired"
        to = ApprovalRequest.entering(edge)
        # Under the row lock taken above: the status read is the status this UPDATE leaves.
        ApprovalRequest.objects.filter(
            pk=approval.pk, status=approval.status, status__in=ApprovalRequest.leaving(edge)
        ).update(status=to, decided_at=now, decision_method=method)
        approval.status = to
        _audit(approval, event, actor="system", **({"reason": method} if to == Status.CANCELLED else {}))
        budget_refund(approval=approval, reason=method)  # an amount it reserved goes back, once
        _announce_end(approval)
    return True


def approvals_expire_due() -> int:
    now = timezone.now()
    due = ApprovalRequest.objects.filter(
        Q(status=Status.PENDING, expires_at__lte=now)
        | Q(status=Status.ISSUED, action_token__expires_at__lte=now, action_token__redeemed_at__isnull=True)
    ).values_list("pk", flat=True)[:1000]
    return sum(approval_expire(approval_id=pk) for pk in list(due))


def approval_cancel(*, approval_id: Any, reason: str) -> bool:
    now = timezone.now()
    with transaction.atomic():
        updated = ApprovalRequest.objects.filter(
            pk=approval_id, status__in=ApprovalRequest.leaving("cancel")
        ).update(status=ApprovalRequest.entering("cancel"), decided_at=now, decision_method=reason)
        if updated != 1:
            return False
        approval = ApprovalRequest.objects.select_related("agent").get(pk=approval_id)
        _audit(approval, "approval.cancelled", actor="system", reason=reason)
        budget_refund(approval=approval, reason=reason)
        _announce_end(approval)
    return True


def approvals_undelivered(*, older_than: int = 30) -> list[Any]:
    """Pending prompts never pushed to the browser (a lost task, Redis down at the time)."""
    now = timezone.now()
    return list(
        ApprovalRequest.objects.filter(
            status=Status.PENDING,
            expires_at__gt=now,
            delivered_at__isnull=True,
            created__lte=now - timedelta(seconds=older_than),
        ).values_list("pk", flat=True)[:1000]
    )


def approvals_cancel_for_grant(*, grant_id: Any, reason: str) -> int:
    ids = list(
        ApprovalRequest.objects.filter(
            grant_id=grant_id, status__in=ApprovalRequest.leaving("cancel")
        ).values_list("pk", flat=True)
    )
    return sum(approval_cancel(approval_id=pk, reason=reason) for pk in ids)


def approvals_cancel_for_instance(*, grant_id: Any, instance: str, reason: str = "instance_cut_off") -> int:
    """The open requests one agent instance made on a grant (it was cut off): cancelled, each audited."""
    ids = list(
        ApprovalRequest.objects.filter(
            grant_id=grant_id, instance=instance, status__in=ApprovalRequest.leaving("cancel")
        ).values_list("pk", flat=True)
    )
    return sum(approval_cancel(approval_id=pk, reason=reason) for pk in ids)


def action_token_redeemed_announce(*, approval: ApprovalRequest) -> None:
    """Tell the user's open inboxes the request is now REDEEMED (their history row changes).

    No SQL statement: the redemption already knows whose request it was.
    """
    _push_removal_after_commit(approval.pk, user_id=approval.user_id, status=Status.REDEEMED)

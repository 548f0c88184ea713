"""Every approval state transition, each one guarded and atomic.

The conditional UPDATE's row count decides every race (two approves, approve
against deny, two collectors, two redeemers): never read-then-write. Celery
tasks and websocket pushes are queued on commit and only carry news of the
row, which stays the source of truth.
"""

import hashlib
import hmac
from contextlib import nullcontext
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import PendingEvent, audit_event, audit_record
from consent import rows
from consent.conf import countersign_settings
from consent.errors import InvalidClient, OAuthError
from consent.models import Agent, ResourceServer, ScopePolicy, SessionGrant
from consent.selectors import forget_resource_server
from consent.services import AuthContext, grant_extend
from consent.tokens import ACTION_TOKEN_TYP, TokenInvalid, bind_to_proof_key, token_type, verify

from . import rar
from .ciba import EXTEND_SCOPE, BackchannelRequest
from .errors import (
    AccessDenied,
    ApprovalNotFound,
    ApprovalNotPending,
    AuthorizationPending,
    ExpiredToken,
    InvalidGrant,
    InvalidRequest,
    InvalidTarget,
    InvalidToken,
    SlowDown,
    TooManyPending,
)
from .models import ActionToken, ApprovalRequest
from .selectors import approval_for_decision
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


def _after_commit(task_name: str, approval_id: Any, **options: Any) -> None:
    from . import tasks

    task = getattr(tasks, task_name)
    # robust: with the broker down, the committed request still answers; the row is the truth, and
    # the redelivery sweep and the inbox's replay on (re)connect bring the news once Redis is back.
    transaction.on_commit(lambda: task.apply_async((str(approval_id),), **options), robust=True)


def _announce_end(approval: ApprovalRequest) -> None:
    """Tell open inboxes the prompt is gone and, in ping mode, tell the agent to collect."""
    _after_commit("push_removal", approval.pk)
    if approval.delivery_mode == ApprovalRequest.DeliveryMode.PING:
        _after_commit("notify_agent", approval.pk)


def _event(approval: ApprovalRequest, event: str, *, actor: str, outcome: str = "ok", error: str = "",
           request=None, **detail: Any) -> PendingEvent:
    return audit_event(event=event, outcome=outcome, error=error, actor=actor, user_id=approval.user_id,
                       client_id=approval.agent.client_id, grant_id=approval.grant_id, request=request,
                       detail={"approval_id": str(approval.pk), "scope": approval.scope, **detail})


def _audit(approval: ApprovalRequest, event: str, **kwargs: Any) -> None:
    _event(approval, event, **kwargs).append()


# --- creation ---------------------------------------------------------------------------------


_APPROVAL = rows.table(ApprovalRequest)


def _pending_state(req: BackchannelRequest, now) -> tuple[Any, bool, int, int, int, int]:
    """One statement: the pending request for this very action (if any) and whether its window has
    passed; how many prompts wait for this user and for this agent; and how many prompts were
    created for this user and by this agent within ``PROMPT_WINDOW_SECONDS`` (approval fatigue caps:
    the second pair counts prompts that ended too, so short-lived prompts cannot slip past)."""
    at = rows.param(ApprovalRequest, "expires_at", now)
    since = rows.param(ApprovalRequest, "created", now - timedelta(seconds=countersign_settings.PROMPT_WINDOW_SECONDS))
    grant_id = rows.param(ApprovalRequest, "grant", req.grant.pk)
    same = f"FROM {_APPROVAL} WHERE grant_id = %s AND scope = %s AND action_hash = %s AND status = %s"
    recent = "AND created > %s AND decision_method <> %s"
    row = rows.fetchone(
        f"SELECT (SELECT id {same}), (SELECT CASE WHEN expires_at <= %s THEN 1 ELSE 0 END {same}),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE user_id = %s AND status = %s AND expires_at > %s),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE agent_id = %s AND status = %s AND expires_at > %s),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE user_id = %s {recent}),"
        f" (SELECT COUNT(*) FROM {_APPROVAL} WHERE agent_id = %s {recent})",
        [grant_id, req.scope, req.action_hash, Status.PENDING,
         at, grant_id, req.scope, req.action_hash, Status.PENDING,
         req.grant.user_id, Status.PENDING, at, req.agent.pk, Status.PENDING, at,
         req.grant.user_id, since, AUTO_RULE, req.agent.pk, since, AUTO_RULE])
    return row[0], bool(row[1]), row[2], row[3], row[4], row[5]


def _existing(req: BackchannelRequest) -> ApprovalRequest:
    return ApprovalRequest.objects.select_related("agent").get(
        grant=req.grant, scope=req.scope, action_hash=req.action_hash, status=Status.PENDING)


def approval_request_create(*, req: BackchannelRequest, request=None) -> tuple[ApprovalRequest, bool]:
    """Persist a validated CIBA request. Returns (approval, created).

    An identical pending request (same grant, scope and action hash) is returned
    as it is: the user sees one prompt, the agent gets the same ``auth_req_id``.
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
        grant=grant, user_id=grant.user_id, agent=req.agent, scope=req.scope,
        authorization_details=req.authorization_details, action_hash=req.action_hash,
        headline=rar.headline(req.authorization_details, system=req.system),
        binding_message=req.binding_message, delivery_mode=req.delivery_mode,
        client_notification_token=req.client_notification_token,
        interval=countersign_settings.CIBA_INTERVAL, created=now,
        # A prompt never outlives its grant: when the grant ends, the prompt's own on-time expiry
        # ends it at that very moment (approval_expire cancels it), and every read that checks
        # expires_at (inbox, caps, polls) stops counting it without waiting for a sweep.
        expires_at=min(now + timedelta(seconds=req.window_seconds), grant.expires_at),
    )
    approval.auth_req_id_hash = auth_req_id_hash(auth_req_id_for(approval.pk))
    rule = req.auto_approve_rule
    auto = bool(rule) and rar.rule_matches(rule, req.authorization_details)
    if auto:
        approval.status = Status.APPROVED
        approval.decided_at = now
        approval.decision_method = AUTO_RULE
        approval.decision_auth = {"rule": rule}
    with transaction.atomic():  # the row and its audit events commit together, or not at all
        if rows.insert_instance(approval, skip_conflicts=True) is None:
            # A concurrent identical request won the partial unique index: answer with that one.
            return _existing(req), False
        approval._state.adding = False
        _audit(approval, "approval.requested", actor=req.agent.actor_id, request=request,
               action_hash=approval.action_hash, headline=approval.headline, mode=approval.delivery_mode,
               expires_in=req.window_seconds)
        if auto:
            _audit(approval, "approval.auto_approved", actor="system", rule=rule)
            if approval.delivery_mode == ApprovalRequest.DeliveryMode.PING:
                _after_commit("notify_agent", approval.pk)
        else:
            # One message per request: the delivery task schedules the on-time expiry
            # (approval_mark_delivered); the expiry sweep covers a prompt never delivered.
            _after_commit("deliver_prompt", approval.pk)
    return approval, True


def approval_mark_delivered(*, approval: ApprovalRequest, channel: str) -> bool:
    """The prompt reached the user's open inboxes: record the first delivery (audited) and schedule
    the window's on-time expiry. Safe to call again: only the first call records anything."""
    if approval.delivered_at is not None:  # a redelivery: recorded already
        return False
    with transaction.atomic():
        first = rows.execute(f"UPDATE {_APPROVAL} SET delivered_at = %s WHERE id = %s AND delivered_at IS NULL",
                             [rows.param(ApprovalRequest, "delivered_at", timezone.now()),
                              rows.param(ApprovalRequest, "id", approval.pk)])
        if first:
            audit_record(event="approval.delivered", actor="system", user_id=approval.user_id,
                         client_id=approval.agent.client_id, grant_id=approval.grant_id,
                         detail={"approval_id": str(approval.pk), "channel": channel})
            _after_commit("expire_approval", approval.pk, eta=approval.expires_at)
    return bool(first)


# --- the user's decision ----------------------------------------------------------------------


_GRANT_LIVE = rows.Columns(SessionGrant, "g", ["status", "expires_at"])
_AGENT_ACTIVE = f"SELECT id FROM {rows.table(Agent)} WHERE status = %s"


def _decide(*, approval_id: Any, user, to: str, method: str, auth: dict[str, Any], request=None,
            approval: ApprovalRequest | None = None) -> ApprovalRequest:
    """PENDING -> APPROVED or DENIED, decided by one conditional UPDATE under the grant's lock.

    ``approval`` is the request as ``selectors.approval_for_decision`` read it for this user (the
    inbox view has it already); only its fixed fields (grant, agent, scope, details) are used.
    """
    if approval is None:
        found = approval_for_decision(approval_id=approval_id, user_id=user.pk)
        if found is None:
            raise ApprovalNotFound(str(approval_id))
        approval = found[0]
    elif approval.user_id != user.pk:
        raise ApprovalNotFound(str(approval_id))
    now = timezone.now()
    with transaction.atomic():
        # Locks in one global order, the grant before its approval, as grant_revoke takes them
        # (it cancels the grant's approvals with the grant locked); approving an extension
        # updates the grant, so locking the approval first could deadlock with a revocation.
        # FOR UPDATE, as grant_extend takes it: no lock upgrade later in this transaction.
        row = rows.fetchone(f"SELECT {_GRANT_LIVE.sql} FROM {rows.table(SessionGrant)} g WHERE g.id = %s"
                            + rows.for_update("g"), [rows.param(SessionGrant, "id", approval.grant_id)])
        grant = _GRANT_LIVE.load(row) if row is not None else None
        live = grant is not None and grant["status"] == SessionGrant.Status.ACTIVE and grant["expires_at"] > now
        # The row count decides: the UPDATE re-checks the request's own status and window on the
        # row it locks (a concurrent decision, expiry or cancellation makes it match nothing).
        decided = live and rows.execute(
            f"UPDATE {_APPROVAL} SET status = %s, decided_at = %s, decided_by_id = %s, decision_method = %s,"
            f" decision_auth = %s WHERE id = %s AND user_id = %s AND status = %s AND expires_at > %s"
            f" AND agent_id IN ({_AGENT_ACTIVE})",
            [to, rows.param(ApprovalRequest, "decided_at", now), user.pk, method,
             rows.param(ApprovalRequest, "decision_auth", auth), rows.param(ApprovalRequest, "id", approval.pk),
             user.pk, Status.PENDING, rows.param(ApprovalRequest, "expires_at", now), Agent.Status.ACTIVE]) == 1
        if not decided:
            raise ApprovalNotPending(
                ApprovalRequest.objects.filter(pk=approval.pk).values_list("status", flat=True).first())
        approval.status = to
        if to == Status.APPROVED and approval.scope == EXTEND_SCOPE:
            grant_extend(grant_id=approval.grant_id, seconds=approval.authorization_details[0]["seconds"],
                         actor=f"user:{user.pk}", approval_id=approval.pk)
        _audit(approval, "approval.approved" if to == Status.APPROVED else "approval.denied",
               actor=f"user:{user.pk}", request=request, method=method, auth=auth)
        _announce_end(approval)
    return approval


def _auth_dict(auth: AuthContext) -> dict[str, Any]:
    return {"auth_time": int(auth.auth_time.timestamp()), "amr": list(auth.amr), "acr": auth.acr}


def approval_approve(*, approval_id: Any, user, auth: AuthContext, request=None,
                     approval: ApprovalRequest | None = None) -> ApprovalRequest:
    return _decide(approval_id=approval_id, user=user, to=Status.APPROVED, method="browser",
                   auth=_auth_dict(auth), request=request, approval=approval)


def approval_deny(*, approval_id: Any, user, auth: AuthContext, request=None,
                  approval: ApprovalRequest | None = None) -> ApprovalRequest:
    return _decide(approval_id=approval_id, user=user, to=Status.DENIED, method="browser",
                   auth=_auth_dict(auth), request=request, approval=approval)


def approval_audit_refused_decision(*, approval_id: Any, user, reason: str, request=None) -> None:
    audit_record(event="approval.decision_refused", outcome="refused", error="not_pending",
                 actor=f"user:{user.pk}", user_id=user.pk, request=request,
                 detail={"approval_id": str(approval_id), "reason": reason})


# --- the agent collects its token (CIBA token request, §10.1) --------------------------------


_COLLECT = rows.Columns(ApprovalRequest, "ap", [
    "id", "status", "expires_at", "interval", "last_polled_at", "agent", "grant", "user", "scope",
    "authorization_details", "action_hash", "decision_auth", "decision_method", "delivery_mode", "decided_at"])
_COLLECT_GRANT = rows.Columns(SessionGrant, "g", ["id", "status", "expires_at", "dpop_jkt", "user"])
_COLLECT_POLICY = rows.Columns(ScopePolicy, "p", ["id", "audience", "action_token_ttl"])
_INTERVAL = connection.ops.quote_name("interval")


def _read_for_collect(auth_req_id: str) -> tuple[ApprovalRequest, dict[str, Any]] | None:
    """One statement: the request behind an ``auth_req_id``, its grant, and its scope's policy."""
    row = rows.fetchone(
        f"SELECT {_COLLECT.sql}, {_COLLECT_GRANT.sql}, {_COLLECT_POLICY.sql} FROM {_APPROVAL} ap"
        f" JOIN {rows.table(SessionGrant)} g ON g.id = ap.grant_id"
        f" LEFT JOIN {rows.table(ScopePolicy)} p ON p.name = ap.scope WHERE ap.auth_req_id_hash = %s",
        [auth_req_id_hash(auth_req_id or "")])
    if row is None:
        return None
    approval, grant, policy = rows.split(row, _COLLECT, _COLLECT_GRANT, _COLLECT_POLICY)
    approval = rows.instance(ApprovalRequest, approval)
    approval.grant = rows.instance(SessionGrant, grant)
    return approval, policy


def approval_collect(*, auth_req_id: str, agent: Agent, jkt: str = "") -> dict[str, Any]:
    """Answer one CIBA poll. Raises the CIBA §11 error for every non-success.

    ``jkt`` is the thumbprint of the poll's DPoP proof key, "" without one (RFC 9449 §6.1).
    """
    now = timezone.now()
    found = _read_for_collect(auth_req_id)
    if found is None or found[0].agent_id != agent.pk:
        raise InvalidGrant("unknown auth_req_id")
    approval, policy = found
    approval.agent = agent
    if approval.status == Status.PENDING:
        if not approval.grant.is_live(now):
            # Checked on read as well: a grant that ended answers no more polls with "pending".
            approval_cancel(approval_id=approval.pk, reason=GRANT_ENDED)
            raise AccessDenied("the session grant has ended")
        if approval.expires_at <= now:
            approval_expire(approval_id=approval.pk)
            raise ExpiredToken("the approval window has passed")
        at = rows.param(ApprovalRequest, "last_polled_at", now)
        too_soon = rows.param(ApprovalRequest, "last_polled_at", now - timedelta(seconds=approval.interval))
        pk = rows.param(ApprovalRequest, "id", approval.pk)
        polled = rows.execute(f"UPDATE {_APPROVAL} SET last_polled_at = %s WHERE id = %s AND status = %s"
                              f" AND (last_polled_at IS NULL OR last_polled_at <= %s)",
                              [at, pk, Status.PENDING, too_soon])
        if polled == 1:
            raise AuthorizationPending("the user has not answered yet")
        rows.execute(f"UPDATE {_APPROVAL} SET {_INTERVAL} = %s, last_polled_at = %s WHERE id = %s",
                     [approval.interval + 5, at, pk])
        raise SlowDown(f"poll at most every {approval.interval + 5} seconds")
    if approval.status == Status.DENIED:
        raise AccessDenied("the user denied this action")
    if approval.status == Status.EXPIRED:
        raise ExpiredToken("the approval window has passed")
    if approval.status == Status.CANCELLED:
        raise AccessDenied(f"the request was cancelled ({approval.decision_method})")
    if approval.status != Status.APPROVED:
        raise InvalidGrant("the token for this auth_req_id was already issued")
    return _issue(approval, policy, now, jkt)


def _issue(approval: ApprovalRequest, policy: dict[str, Any], now, jkt: str) -> dict[str, Any]:
    if not approval.grant.is_live(now) or approval.agent.status != Agent.Status.ACTIVE:
        approval_cancel(approval_id=approval.pk, reason=GRANT_ENDED)
        raise AccessDenied("the session grant or the agent is no longer active")
    known = policy["id"] is not None
    # A grant extension has no downstream system: its token is addressed to us, as a receipt.
    audience = policy["audience"] if known else countersign_settings.ISSUER
    ttl = policy["action_token_ttl"] if known else countersign_settings.DEFAULT_ACTION_TOKEN_TTL
    claims = bind_to_proof_key(action_claims(approval=approval, audience=audience, ttl=ttl), jkt=jkt,
                               grant_jkt=approval.grant.dpop_jkt)
    # APPROVED -> ISSUED decides who collects; the action token and its audit row land with it, in one
    # statement. ISSUED -> EXPIRED once the token lapses unredeemed is the expiry sweep's (redemption
    # refuses an expired token by itself), so collecting queues nothing.
    batch = rows.Batch(rows.guarded_update(ApprovalRequest, approval.pk, {"status": Status.ISSUED}, "status = %s",
                                           [Status.APPROVED]))
    batch.insert("token", ActionToken, {"jti": claims["jti"], "approval": approval.pk, "issued_at": now,
                                        "expires_at": now + timedelta(seconds=ttl), "redeemed_at": None,
                                        "redeemed_by": None})
    batch.event("audit", _event(approval, "action_token.issued", actor=approval.agent.actor_id, jti=claims["jti"],
                                expires_in=ttl))
    if batch.run() is None:
        raise InvalidGrant("the token for this auth_req_id was already issued")
    response = {"access_token": mint(claims), "token_type": token_type(jkt), "expires_in": ttl,
                "scope": approval.scope, "authorization_details": approval.authorization_details}
    if approval.scope == EXTEND_SCOPE:
        response["grant_expires_at"] = int(SessionGrant.objects.get(pk=approval.grant_id).expires_at.timestamp())
    return response


# --- endings without a user decision ----------------------------------------------------------


def approval_expire(*, approval_id: Any) -> bool:
    """PENDING past its window, or ISSUED with its action token expired unredeemed -> EXPIRED.

    A PENDING prompt whose grant has ended (its window is capped at the grant's end) is CANCELLED
    instead, as revocation cancels them: the user never gets to answer it.
    """
    now = timezone.now()
    with transaction.atomic():
        approval = (ApprovalRequest.objects.select_for_update(of=("self",)).select_related("agent", "grant")
                    .filter(pk=approval_id).first())
        if approval is None:
            return False
        token = ActionToken.objects.filter(approval_id=approval.pk).first()
        due = (approval.status == Status.PENDING and approval.expires_at <= now) or (
            approval.status == Status.ISSUED and token is not None and token.redeemed_at is None
            and token.expires_at <= now)
        if not due:
            return False
        if approval.status == Status.PENDING and not approval.grant.is_live(now):
            to, method, event = Status.CANCELLED, GRANT_ENDED, "approval.cancelled"
        else:
            to, method, event = Status.EXPIRED, "timeout", "approval.expired"
        ApprovalRequest.objects.filter(pk=approval.pk, status=approval.status).update(
            status=to, decided_at=now, decision_method=method)
        approval.status = to
        _audit(approval, event, actor="system", **({"reason": method} if to == Status.CANCELLED else {}))
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
        updated = ApprovalRequest.objects.filter(pk=approval_id, status__in=ApprovalRequest.OPEN).update(
            status=Status.CANCELLED, decided_at=now, decision_method=reason)
        if updated != 1:
            return False
        approval = ApprovalRequest.objects.select_related("agent").get(pk=approval_id)
        _audit(approval, "approval.cancelled", actor="system", reason=reason)
        _announce_end(approval)
    return True


def approvals_undelivered(*, older_than: int = 30) -> list[Any]:
    """Pending prompts never pushed to the browser (a lost task, Redis down at the time)."""
    now = timezone.now()
    return list(ApprovalRequest.objects.filter(
        status=Status.PENDING, expires_at__gt=now, delivered_at__isnull=True,
        created__lte=now - timedelta(seconds=older_than)).values_list("pk", flat=True)[:1000])


def approvals_cancel_for_grant(*, grant_id: Any, reason: str) -> int:
    ids = list(ApprovalRequest.objects.filter(grant_id=grant_id, status__in=ApprovalRequest.OPEN)
               .values_list("pk", flat=True))
    return sum(approval_cancel(approval_id=pk, reason=reason) for pk in ids)


# --- redemption by the resource server ------------------------------------------------------


_TOKEN = rows.table(ActionToken)
_JOINED = (f" {_APPROVAL} ap, {rows.table(SessionGrant)} g, {rows.table(Agent)} ag WHERE ap.id = t.approval_id"
           f" AND g.id = ap.grant_id AND ag.id = ap.agent_id")
_RS_CURRENT = (f"EXISTS (SELECT 1 FROM {rows.table(ResourceServer)} r WHERE r.id = %s AND r.is_active = %s"
               f" AND r.client_secret = %s)")
# The winning UPDATE: unredeemed, unexpired, ISSUED, live grant, active agent, same resource server.
_WIN = (f"UPDATE {_TOKEN} AS t SET redeemed_at = %s, redeemed_by_id = %s FROM{_JOINED}"
        f" AND t.jti = %s AND t.redeemed_at IS NULL AND t.expires_at > %s AND ap.status = %s AND g.status = %s"
        f" AND g.expires_at > %s AND ag.status = %s AND {_RS_CURRENT} RETURNING approval_id")
_MOVE = f"UPDATE {_APPROVAL} SET status = %s WHERE id = %s AND status = %s"
# Why an attempt did not win (read in the same statement on PostgreSQL, after it elsewhere).
_WHY = (f"t.redeemed_at IS NOT NULL, CASE WHEN t.expires_at <= %s THEN 1 ELSE 0 END, ap.status, g.status,"
        f" CASE WHEN g.expires_at <= %s THEN 1 ELSE 0 END, ag.status, {_RS_CURRENT}"
        f" FROM {_TOKEN} t,{_JOINED} AND t.jti = %s")


def _redeem_refusal(why: tuple[Any, ...] | None) -> OAuthError:
    if why is None:
        return InvalidToken("unknown action token")
    redeemed, expired, approval_status, grant_status, grant_ended, agent_status, rs_current = why
    if not rs_current:
        return InvalidClient("Resource-server authentication failed.",
                             reason="resource server deactivated or its secret changed since it was verified")
    if grant_status != SessionGrant.Status.ACTIVE or grant_ended:
        return InvalidToken("the session grant is no longer active")
    if agent_status != Agent.Status.ACTIVE:
        return InvalidToken("the agent is suspended")
    if expired and not redeemed:
        return InvalidToken("action token expired")
    if approval_status not in (Status.ISSUED, Status.REDEEMED):
        return InvalidToken(f"the approval is {approval_status}")
    # Redeemed: before this statement began, or by the one it waited for.
    return InvalidToken("action token already redeemed")


# PostgreSQL: the winning UPDATE also takes the request's row lock while it is still ISSUED, so a
# concurrent cancel either waits for the redemption or ends the request first (and nothing wins);
# ISSUED -> REDEEMED then always moves with the token, in the same statement.
_HOLD_ISSUED = (f" AND t.approval_id IN (SELECT la.id FROM {_APPROVAL} la JOIN {_TOKEN} lt ON lt.approval_id = la.id"
                f" WHERE lt.jti = %s AND la.status = %s FOR UPDATE OF la)")
_WIN_HOLDING = _WIN.replace(" RETURNING", _HOLD_ISSUED + " RETURNING")


def _redeem_statement(*, jti: str, resource_server: ResourceServer, now,
                      event: PendingEvent) -> tuple[Any, int, tuple | None]:
    """(approval id or None, requests moved ISSUED -> REDEEMED, why it lost).

    On PostgreSQL one statement, outside any transaction: it redeems, moves the request,
    writes ``event`` (the winner's audit row), or reads why it lost. Elsewhere the same steps
    run one after another in the caller's transaction.
    """
    at = rows.param(ActionToken, "redeemed_at", now)
    grant_at = rows.param(SessionGrant, "expires_at", now)
    rs = [resource_server.pk, True, resource_server.client_secret]
    win = [at, resource_server.pk, jti, at, Status.ISSUED, SessionGrant.Status.ACTIVE, grant_at,
           Agent.Status.ACTIVE, *rs]
    why = [at, grant_at, *rs, jti]
    if connection.vendor == "postgresql":
        audit_sql, audit_params = rows.event_insert(event, "moved")
        row = rows.fetchone(
            f"WITH won AS ({_WIN_HOLDING}),"
            f" moved AS (UPDATE {_APPROVAL} m SET status = %s FROM won"
            f" WHERE m.id = won.approval_id AND m.status = %s RETURNING m.id), written AS ({audit_sql})"
            f" SELECT (SELECT approval_id FROM won), (SELECT COUNT(*) FROM moved), {_WHY}",
            [*win, jti, Status.ISSUED, Status.REDEEMED, Status.ISSUED, *audit_params, *why])
        if row is None:
            return None, 0, None
        return row[0], row[1], tuple(row[2:])
    won = rows.fetchone(_WIN, win)
    if won is None:
        return None, 0, rows.fetchone(f"SELECT {_WHY}", why)
    moved = rows.execute(_MOVE, [Status.REDEEMED, won[0], Status.ISSUED])
    if moved == 1:
        event.append()
    return won[0], moved, None


def action_token_redeemed_announce(*, approval_id: Any) -> None:
    """Tell the user's open inboxes the request is now REDEEMED (their history row changes).

    A Celery message only (no SQL statement): the task reads the row and pushes it.
    """
    _after_commit("push_removal", approval_id)


def action_token_verify(*, token: str, resource_server: ResourceServer, request_hash: str = "") -> dict[str, Any]:
    """Verify an action token for redemption by this resource server; the claims, or ``OAuthError``.

    RFC 8725 §3.11: only an ``action+jwt``. ``request_hash`` is the action hash the
    resource server recomputed from the request it is about to execute (it must be
    the approved one).
    """
    if not token:
        raise InvalidRequest("the token parameter is required")
    try:
        claims = verify(token, typ=ACTION_TOKEN_TYP)
    except TokenInvalid as exc:
        raise InvalidToken(str(exc)) from exc
    if claims.get("aud") != resource_server.audience:
        raise InvalidTarget("this action token is for another resource server")
    if claims.get("action_hash") != rar.action_hash(claims.get("authorization_details") or []):
        raise InvalidToken("action_hash does not match the token's authorization_details")
    if request_hash and request_hash != claims["action_hash"]:
        raise InvalidRequest("the action you are about to execute is not the approved one (action_hash differs)")
    return claims


def action_token_redeem(*, claims: dict[str, Any], resource_server: ResourceServer) -> ApprovalRequest:
    """Mark the action token redeemed: exactly one caller ever wins.

    ``claims`` come from a verified ``action+jwt`` whose audience is this resource
    server. One conditional UPDATE decides, and checks in the same statement that the
    request is ISSUED, its grant and agent are still active, and the resource server
    is still active with the credentials it was verified with; the winner's request
    moves ISSUED -> REDEEMED with it and its audit row is written, all in that one
    statement on PostgreSQL. A losing attempt costs the same one statement (which reads why
    it lost); its refusal is audited by the endpoint.
    """
    now = timezone.now()
    jti = claims["jti"]
    if "approval_id" not in claims:  # every action token we mint names its request
        raise InvalidToken("unknown action token")
    approval = ApprovalRequest(pk=UUID(claims["approval_id"]), status=Status.REDEEMED, scope=claims["scope"],
                               grant_id=UUID(claims["grant_id"]), user_id=int(claims["sub"].split(":", 1)[1]),
                               authorization_details=claims["authorization_details"],
                               action_hash=claims["action_hash"])
    approval._state.adding = False
    event = audit_event(event="action_token.redeemed", actor=f"rs:{resource_server.client_id}",
                        user_id=approval.user_id, client_id=claims["client_id"], grant_id=approval.grant_id,
                        detail={"approval_id": str(approval.pk), "scope": approval.scope, "jti": jti})
    with transaction.atomic() if connection.vendor != "postgresql" else nullcontext():
        won, moved, why = _redeem_statement(jti=jti, resource_server=resource_server, now=now, event=event)
        if won is None:
            refusal = _redeem_refusal(why)
            if isinstance(refusal, InvalidClient):
                forget_resource_server(resource_server.client_id)
            raise refusal
        if moved != 1:  # only without row locks; inside the transaction, this rolls the redemption back
            raise InvalidToken("the approval changed while it was redeemed")
    approval.redeemed_at = now  # what the statement stored, for the receipt
    return approval

"""Every approval state transition, each one guarded and atomic.

The conditional UPDATE's row count decides every race (two approves, approve
against deny, two collectors, two redeemers): never read-then-write. Celery
tasks and websocket pushes are queued on commit and only carry news of the
row, which stays the source of truth.
"""

import hashlib
import hmac
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import audit_record
from consent.conf import countersign_settings
from consent.models import Agent, ResourceServer, ScopePolicy, SessionGrant
from consent.services import AuthContext, grant_extend
from consent.tokens import bind_to_proof_key, token_type

from . import rar
from .ciba import EXTEND_SCOPE, BackchannelRequest
from .errors import (
    AccessDenied,
    ApprovalNotFound,
    ApprovalNotPending,
    AuthorizationPending,
    ExpiredToken,
    InvalidGrant,
    SlowDown,
    TooManyPending,
)
from .models import ActionToken, ApprovalRequest
from .tokens import action_claims, mint

Status = ApprovalRequest.Status


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


def _audit(approval: ApprovalRequest, event: str, *, actor: str, outcome: str = "ok", error: str = "",
           request=None, **detail: Any) -> None:
    audit_record(event=event, outcome=outcome, error=error, actor=actor, user_id=approval.user_id,
                 client_id=approval.agent.client_id, grant_id=approval.grant_id, request=request,
                 detail={"approval_id": str(approval.pk), "scope": approval.scope, **detail})


# --- creation ---------------------------------------------------------------------------------


def _check_caps(req: BackchannelRequest, now) -> None:
    pending = ApprovalRequest.objects.filter(status=Status.PENDING, expires_at__gt=now)
    if pending.filter(user_id=req.grant.user_id).count() >= countersign_settings.MAX_PENDING_PER_USER:
        raise TooManyPending("the user already has too many approvals waiting; try again later")
    if pending.filter(agent=req.agent).count() >= countersign_settings.MAX_PENDING_PER_AGENT:
        raise TooManyPending("this agent already has too many approvals waiting; try again later")


def approval_request_create(*, req: BackchannelRequest, request=None) -> tuple[ApprovalRequest, bool]:
    """Persist a validated CIBA request. Returns (approval, created).

    An identical pending request (same grant, scope and action hash) is returned
    as it is: the user sees one prompt, the agent gets the same ``auth_req_id``.
    """
    now = timezone.now()
    same = ApprovalRequest.objects.filter(grant=req.grant, scope=req.scope, action_hash=req.action_hash,
                                          status=Status.PENDING)
    for stale in list(same.filter(expires_at__lte=now).values_list("pk", flat=True)):
        approval_expire(approval_id=stale)  # audited and removed from inboxes like any expiry
    existing = same.select_related("agent").first()
    if existing is not None:
        return existing, False
    _check_caps(req, now)
    grant = req.grant
    approval = ApprovalRequest(
        grant=grant, user_id=grant.user_id, agent=req.agent, scope=req.scope,
        authorization_details=req.authorization_details, action_hash=req.action_hash,
        headline=rar.headline(req.authorization_details, system=req.system),
        binding_message=req.binding_message, delivery_mode=req.delivery_mode,
        client_notification_token=req.client_notification_token,
        interval=countersign_settings.CIBA_INTERVAL, created=now,
        expires_at=now + timedelta(seconds=req.window_seconds),
    )
    approval.auth_req_id_hash = auth_req_id_hash(auth_req_id_for(approval.pk))
    rule = req.auto_approve_rule
    auto = bool(rule) and rar.rule_matches(rule, req.authorization_details)
    if auto:
        approval.status = Status.APPROVED
        approval.decided_at = now
        approval.decision_method = "auto_rule"
        approval.decision_auth = {"rule": rule}
    with transaction.atomic():  # the row and its audit events commit together, or not at all
        try:
            with transaction.atomic():
                approval.save(force_insert=True)
        except IntegrityError:  # a concurrent identical request won the partial unique index
            return same.select_related("agent").get(), False
        _audit(approval, "approval.requested", actor=req.agent.actor_id, request=request,
               action_hash=approval.action_hash, headline=approval.headline, mode=approval.delivery_mode,
               expires_in=req.window_seconds)
        if auto:
            _audit(approval, "approval.auto_approved", actor="system", rule=rule)
            if approval.delivery_mode == ApprovalRequest.DeliveryMode.PING:
                _after_commit("notify_agent", approval.pk)
        else:
            _after_commit("deliver_prompt", approval.pk)
            _after_commit("expire_approval", approval.pk, eta=approval.expires_at)
    return approval, True


# --- the user's decision ----------------------------------------------------------------------


def _decide(*, approval_id: Any, user, to: str, method: str, auth: dict[str, Any], request=None) -> ApprovalRequest:
    now = timezone.now()
    with transaction.atomic():
        # Locks in one global order, the grant before its approval, as grant_revoke takes them
        # (it cancels the grant's approvals with the grant locked); approving an extension
        # updates the grant, so locking the approval first could deadlock with a revocation.
        grant_id = ApprovalRequest.objects.filter(pk=approval_id, user=user).values_list("grant_id", flat=True).first()
        if grant_id is None:
            raise ApprovalNotFound(str(approval_id))
        # FOR UPDATE, as grant_extend takes it: no lock upgrade later in this transaction.
        list(SessionGrant.objects.select_for_update().filter(pk=grant_id).values_list("pk", flat=True))
        # Lock the row, then check: an UPDATE filtered through joins would not re-check the
        # status of a row another transaction changed meanwhile (PostgreSQL READ COMMITTED).
        approval = (ApprovalRequest.objects.select_for_update(of=("self",)).select_related("agent", "grant")
                    .filter(pk=approval_id, user=user).first())
        if approval is None:
            raise ApprovalNotFound(str(approval_id))
        decidable = (approval.status == Status.PENDING and approval.expires_at > now
                     and approval.grant.is_live(now) and approval.agent.status == Agent.Status.ACTIVE)
        if not decidable:
            raise ApprovalNotPending(approval.status)
        ApprovalRequest.objects.filter(pk=approval.pk, status=Status.PENDING).update(
            status=to, decided_at=now, decided_by=user, decision_method=method, decision_auth=auth)
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


def approval_approve(*, approval_id: Any, user, auth: AuthContext, request=None) -> ApprovalRequest:
    return _decide(approval_id=approval_id, user=user, to=Status.APPROVED, method="browser",
                   auth=_auth_dict(auth), request=request)


def approval_deny(*, approval_id: Any, user, auth: AuthContext, request=None) -> ApprovalRequest:
    return _decide(approval_id=approval_id, user=user, to=Status.DENIED, method="browser",
                   auth=_auth_dict(auth), request=request)


def approval_audit_refused_decision(*, approval_id: Any, user, reason: str, request=None) -> None:
    audit_record(event="approval.decision_refused", outcome="refused", error="not_pending",
                 actor=f"user:{user.pk}", user_id=user.pk, request=request,
                 detail={"approval_id": str(approval_id), "reason": reason})


# --- the agent collects its token (CIBA token request, §10.1) --------------------------------


def approval_collect(*, auth_req_id: str, agent: Agent) -> dict[str, Any]:
    """Answer one CIBA poll. Raises the CIBA §11 error for every non-success."""
    now = timezone.now()
    approval = (
        ApprovalRequest.objects.select_related("agent", "grant")
        .filter(auth_req_id_hash=auth_req_id_hash(auth_req_id or ""))
        .first()
    )
    if approval is None or approval.agent_id != agent.pk:
        raise InvalidGrant("unknown auth_req_id")
    if approval.status == Status.PENDING:
        if approval.expires_at <= now:
            approval_expire(approval_id=approval.pk)
            raise ExpiredToken("the approval window has passed")
        too_soon = now - timedelta(seconds=approval.interval)
        polled = ApprovalRequest.objects.filter(pk=approval.pk, status=Status.PENDING).filter(
            Q(last_polled_at__isnull=True) | Q(last_polled_at__lte=too_soon)
        ).update(last_polled_at=now)
        if polled == 1:
            raise AuthorizationPending("the user has not answered yet")
        ApprovalRequest.objects.filter(pk=approval.pk).update(interval=approval.interval + 5, last_polled_at=now)
        raise SlowDown(f"poll at most every {approval.interval + 5} seconds")
    if approval.status == Status.DENIED:
        raise AccessDenied("the user denied this action")
    if approval.status == Status.EXPIRED:
        raise ExpiredToken("the approval window has passed")
    if approval.status == Status.CANCELLED:
        raise AccessDenied(f"the request was cancelled ({approval.decision_method})")
    if approval.status != Status.APPROVED:
        raise InvalidGrant("the token for this auth_req_id was already issued")
    return _issue(approval, now)


def _issue(approval: ApprovalRequest, now) -> dict[str, Any]:
    if not approval.grant.is_live(now) or approval.agent.status != Agent.Status.ACTIVE:
        approval_cancel(approval_id=approval.pk, reason="grant_ended")
        raise AccessDenied("the session grant or the agent is no longer active")
    policy = ScopePolicy.objects.filter(name=approval.scope).first()
    # A grant extension has no downstream system: its token is addressed to us, as a receipt.
    audience = policy.audience if policy else countersign_settings.ISSUER
    ttl = policy.action_token_ttl if policy else countersign_settings.DEFAULT_ACTION_TOKEN_TTL
    with transaction.atomic():
        if ApprovalRequest.objects.filter(pk=approval.pk, status=Status.APPROVED).update(status=Status.ISSUED) != 1:
            raise InvalidGrant("the token for this auth_req_id was already issued")
        claims = bind_to_proof_key(action_claims(approval=approval, audience=audience, ttl=ttl))
        ActionToken.objects.create(jti=claims["jti"], approval=approval, issued_at=now,
                                   expires_at=now + timedelta(seconds=ttl))
        _audit(approval, "action_token.issued", actor=approval.agent.actor_id, jti=claims["jti"], expires_in=ttl)
        _after_commit("expire_approval", approval.pk, eta=now + timedelta(seconds=ttl + 1))
    response = {"access_token": mint(claims), "token_type": token_type(), "expires_in": ttl,
                "scope": approval.scope, "authorization_details": approval.authorization_details}
    if approval.scope == EXTEND_SCOPE:
        response["grant_expires_at"] = int(SessionGrant.objects.get(pk=approval.grant_id).expires_at.timestamp())
    return response


# --- endings without a user decision ----------------------------------------------------------


def approval_expire(*, approval_id: Any) -> bool:
    """PENDING past its window, or ISSUED with its action token expired unredeemed -> EXPIRED."""
    now = timezone.now()
    with transaction.atomic():
        approval = (ApprovalRequest.objects.select_for_update(of=("self",)).select_related("agent")
                    .filter(pk=approval_id).first())
        if approval is None:
            return False
        token = ActionToken.objects.filter(approval_id=approval.pk).first()
        due = (approval.status == Status.PENDING and approval.expires_at <= now) or (
            approval.status == Status.ISSUED and token is not None and token.redeemed_at is None
            and token.expires_at <= now)
        if not due:
            return False
        ApprovalRequest.objects.filter(pk=approval.pk, status=approval.status).update(
            status=Status.EXPIRED, decided_at=now, decision_method="timeout")
        approval.status = Status.EXPIRED
        _audit(approval, "approval.expired", actor="system")
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


def action_token_redeem(*, claims: dict[str, Any], resource_server: ResourceServer) -> ApprovalRequest:
    """Mark the action token redeemed: exactly one caller ever wins (conditional UPDATE).

    ``claims`` come from a verified ``action+jwt`` whose audience is this resource
    server. The grant and the agent must still be active.
    """
    from .errors import InvalidToken

    now = timezone.now()
    token = ActionToken.objects.select_related("approval__grant", "approval__agent").filter(
        jti=claims["jti"]).first()
    if token is None:
        raise InvalidToken("unknown action token")
    approval = token.approval
    if not approval.grant.is_live(now):
        raise InvalidToken("the session grant is no longer active")
    if approval.agent.status != Agent.Status.ACTIVE:
        raise InvalidToken("the agent is suspended")
    with transaction.atomic():
        won = ActionToken.objects.filter(pk=token.pk, redeemed_at__isnull=True, expires_at__gt=now).update(
            redeemed_at=now, redeemed_by=resource_server)
        if won != 1:
            raise InvalidToken("action token already redeemed" if ActionToken.objects.filter(
                pk=token.pk, redeemed_at__isnull=False).exists() else "action token expired")
        if ApprovalRequest.objects.filter(pk=approval.pk, status=Status.ISSUED).update(status=Status.REDEEMED) != 1:
            # Cancelled or expired meanwhile: raising rolls the token's redemption back.
            raise InvalidToken(f"the approval is {ApprovalRequest.objects.get(pk=approval.pk).status}")
        _audit(approval, "action_token.redeemed", actor=f"rs:{resource_server.client_id}", jti=token.jti)
    approval.status = Status.REDEEMED
    return approval

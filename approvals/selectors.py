from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.utils import timezone

from consent import rows
from consent.models import Agent, ResourceServer, ScopePolicy

from .models import ApprovalRequest, ApprovalVote
from .quorum import Quorum, eligible_ids, quorum_of

if TYPE_CHECKING:
    from consent.selectors import Introspection


def pending_for_user(*, user: User) -> QuerySet[ApprovalRequest]:
    return (
        ApprovalRequest.objects.select_related("agent")
        .filter(user=user, status=ApprovalRequest.Status.PENDING, expires_at__gt=timezone.now())
        .order_by("created")
    )


def history_for_user(*, user: User, limit: int = 50) -> QuerySet[ApprovalRequest]:
    return (
        ApprovalRequest.objects.select_related("agent", "decided_by")
        .filter(user=user)
        .exclude(status=ApprovalRequest.Status.PENDING, expires_at__gt=timezone.now())
        .order_by("-created")[:limit]
    )


def pending_count(*, user: User) -> int:
    return pending_for_user(user=user).count()


# --- what the delivery tasks read (one hand-written statement each, consent.rows) -----------------

_PUSH = rows.Columns(
    ApprovalRequest,
    "ap",
    [
        "id",
        "status",
        "user",
        "grant",
        "agent",
        "scope",
        "headline",
        "authorization_details",
        "binding_message",
        "budget_note",
        "created",
        "expires_at",
        "delivered_at",
        "instance",
    ],
)
_PUSH_AGENT = rows.Columns(Agent, "a", ["id", "name", "publisher", "client_id"])


def _pk(approval_id: Any) -> Any:
    """An approval id from outside (a task argument, a URL) as the database wants it; None if malformed."""
    try:
        return rows.param(ApprovalRequest, "id", UUID(str(approval_id)))
    except ValueError:
        return None


def approval_for_push(*, approval_id: Any) -> ApprovalRequest | None:
    """The request and the agent fields its prompt shows, in one statement; None if there is none.

    A delivery task runs this for every prompt and removal it carries; through the ORM the same
    read spent most of the task's CPU compiling the query (py-spy, bench/load.py).
    """
    pk = _pk(approval_id)
    if pk is None:
        return None
    row = rows.fetchone(
        f"SELECT {_PUSH.sql}, {_PUSH_AGENT.sql} FROM {rows.table(ApprovalRequest)} ap"
        f" JOIN {rows.table(Agent)} a ON a.id = ap.agent_id WHERE ap.id = %s",
        [pk],
    )
    if row is None:
        return None
    values, agent = rows.split(row, _PUSH, _PUSH_AGENT)
    approval = rows.instance(ApprovalRequest, values)
    approval.agent = rows.instance(Agent, agent)
    return approval


_DECISION = rows.Columns(
    ApprovalRequest,
    "ap",
    [
        "id",
        "status",
        "user",
        "grant",
        "agent",
        "scope",
        "headline",
        "authorization_details",
        "delivery_mode",
        "expires_at",
        "instance",
    ],
)
_DECISION_AGENT = rows.Columns(Agent, "a", ["id", "client_id", "status"])
_DECISION_POLICY = rows.Columns(
    ScopePolicy, "p", ["fresh_auth_seconds", "quorum", "approver_group", "exclude_requester", "quorum_when"]
)


class Decision(NamedTuple):
    """A request as a decision on it needs it: the request with its agent, the scope's
    fresh-authentication window (0 for none), and the quorum its policy asks (None: the user alone)."""

    approval: ApprovalRequest
    fresh_auth_seconds: int
    quorum: Quorum | None


def approval_for_decision(*, approval_id: Any, user_id: int) -> Decision | None:
    """The request this person may decide or vote on, in one statement; None if they may not.

    Its user may always; someone else only when its policy asks for a quorum and they are an
    approver now or voted on it before. What this reads of the request never changes after it is
    created (its grant, agent, scope, details); its status is shown only for the answer, the
    decision itself re-checks it.
    """
    pk = _pk(approval_id)
    if pk is None:
        return None
    row = rows.fetchone(
        f"SELECT {_DECISION.sql}, {_DECISION_AGENT.sql}, {_DECISION_POLICY.sql} FROM {rows.table(ApprovalRequest)} ap"
        f" JOIN {rows.table(Agent)} a ON a.id = ap.agent_id"
        f" LEFT JOIN {rows.table(ScopePolicy)} p ON p.name = ap.scope WHERE ap.id = %s",
        [pk],
    )
    if row is None:
        return None
    values, agent, policy = rows.split(row, _DECISION, _DECISION_AGENT, _DECISION_POLICY)
    approval = rows.instance(ApprovalRequest, values)
    approval.agent = rows.instance(Agent, agent)
    quorum = quorum_of(
        size=policy["quorum"],
        group_id=policy["approver_group"],
        exclude_requester=bool(policy["exclude_requester"]),
        when=policy["quorum_when"] or "",
        details=approval.authorization_details,
    )
    decision = Decision(approval, policy["fresh_auth_seconds"] or 0, quorum)
    if approval.user_id == int(user_id):
        return decision
    if quorum is None:
        return None
    if int(user_id) in eligible_ids(requester_id=approval.user_id, quorum=quorum):
        return decision
    voted = ApprovalVote.objects.filter(approval_id=approval.pk, user_id=int(user_id)).exists()
    return decision if voted else None


def action_token_introspect(*, token: str, resource_server: ResourceServer) -> Introspection:
    """RFC 7662 §2.2 for an action token (``typ: action+jwt``), asked by a resource server.

    Active while it is valid and unspent: it verifies, its ``aud`` is this resource
    server's audience (§4: other callers learn nothing), it is not expired, not yet
    redeemed, its request is ISSUED, and its grant and agent are still active. The
    answer carries the approved ``authorization_details`` (RFC 9396 §9.2), with the
    ``action_hash`` and ``approval_id`` the redemption will check.
    """
    from django.db.models import Exists, OuterRef

    from consent.models import AgentInstance, SessionGrant
    from consent.selectors import Introspection
    from consent.tokens import ACTION_TOKEN_TYP, TokenInvalid, verify

    from .models import ActionToken

    try:
        claims = verify(token, typ=ACTION_TOKEN_TYP)
    except TokenInvalid as exc:
        return Introspection(False, {}, str(exc))
    if claims.get("aud") != resource_server.audience:
        return Introspection(False, {}, "token not issued for this resource server")
    cut_off = AgentInstance.objects.filter(
        grant_id=OuterRef("approval__grant_id"),
        instance_id=OuterRef("approval__instance"),
        status=AgentInstance.Status.CUT_OFF,
    )
    row = (
        ActionToken.objects.filter(jti=claims["jti"])
        .annotate(instance_cut_off=Exists(cut_off))
        .values_list(
            "redeemed_at",
            "expires_at",
            "approval__status",
            "approval__grant__status",
            "approval__grant__expires_at",
            "approval__agent__status",
            "instance_cut_off",
        )
        .first()
    )
    if row is None:
        return Introspection(False, {}, "unknown action token")
    redeemed_at, expires_at, status, grant_status, grant_expires, agent_status, instance_cut_off = row
    now = timezone.now()
    if redeemed_at is not None:
        return Introspection(False, {}, "action token already redeemed")
    if expires_at <= now:
        return Introspection(False, {}, "action token expired")
    if grant_status != SessionGrant.Status.ACTIVE or grant_expires <= now:
        return Introspection(False, {}, f"grant {grant_status}")
    if agent_status != Agent.Status.ACTIVE:
        return Introspection(False, {}, "agent suspended")
    if instance_cut_off:
        return Introspection(False, {}, "instance cut off")
    if status != ApprovalRequest.Status.ISSUED:
        return Introspection(False, {}, f"the approval is {status}")
    return Introspection(True, claims)

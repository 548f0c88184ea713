"""The approval state machine, table-driven (in the style of Hydra's state_transition_test).

Every (starting state, transition) pair is one case. Each starting state is a real
row built through the services (time passing is simulated with a queryset
``.update()`` of an expiry, for setup only); the transition is one service call.
The table says what must come of it: the new status and the service's return
value, or the exact exception with the status unchanged, and the audit events the
transition appends. Terminal states (DENIED, EXPIRED, CANCELLED, REDEEMED) must
never change, whatever is tried on them.

DESIGN.md::

    PENDING --approve--> APPROVED --token collected--> ISSUED --redeem--> REDEEMED
    PENDING --deny-----> DENIED
    PENDING --timeout--> EXPIRED            (approval window passed)
    PENDING/APPROVED/ISSUED --grant revoked, agent suspended, or agent cancels--> CANCELLED
    ISSUED  --action token expired unredeemed--> EXPIRED
"""

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db.models import Max
from django.utils import timezone

from approvals.errors import (
    AccessDenied,
    ApprovalNotPending,
    AuthorizationPending,
    ExpiredToken,
    InvalidGrant,
    InvalidToken,
)
from approvals.models import ActionToken, ApprovalRequest
from approvals.redemption import action_token_redeem
from approvals.services import (
    approval_approve,
    approval_cancel,
    approval_collect,
    approval_deny,
    approval_expire,
)
from audit.models import AuditEvent
from consent.models import ScopePolicy
from consent.tokens import ACTION_TOKEN_TYP, verify
from tests.approvals.support import (
    auth_now,
    auth_req_id,
    install_outbox,
    ledger_rs,
    request_approval,
    session_grant,
)
from tests.conftest import Scenario

pytestmark = pytest.mark.django_db

S = ApprovalRequest.Status
PAST = timedelta(seconds=5)


# --- building each starting state through the services ------------------------------------------


@dataclass
class Row:
    approval: ApprovalRequest
    auth_req_id: str
    token: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)

    def fresh(self) -> ApprovalRequest:
        return ApprovalRequest.objects.get(pk=self.approval.pk)


class Build:
    """Each method returns a Row in one starting state, reached only through service calls."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.grant = session_grant(scenario)
        self.rs = ledger_rs(scenario)

    def _expect(self, row: Row, status: str) -> Row:
        assert row.fresh().status == status, f"setup did not reach {status}"
        return row

    def pending(self) -> Row:
        approval, created = request_approval(self.grant)
        assert created
        return self._expect(Row(approval, auth_req_id(approval)), S.PENDING)

    def pending_past_window(self) -> Row:
        """PENDING whose window has passed, before any sweep or poll noticed."""
        row = self.pending()
        ApprovalRequest.objects.filter(pk=row.approval.pk).update(expires_at=timezone.now() - PAST)
        return self._expect(row, S.PENDING)

    def approved(self) -> Row:
        row = self.pending()
        approval_approve(approval_id=row.approval.pk, user=self.s.user, auth=auth_now())
        return self._expect(row, S.APPROVED)

    def issued(self) -> Row:
        row = self.approved()
        body = approval_collect(auth_req_id=row.auth_req_id, agent=self.s.agent)
        row.token = body["access_token"]
        row.claims = verify(row.token, typ=ACTION_TOKEN_TYP)
        return self._expect(row, S.ISSUED)

    def redeemed(self) -> Row:
        row = self.issued()
        action_token_redeem(claims=row.claims, resource_server=self.rs)
        return self._expect(row, S.REDEEMED)

    def denied(self) -> Row:
        row = self.pending()
        approval_deny(approval_id=row.approval.pk, user=self.s.user, auth=auth_now())
        return self._expect(row, S.DENIED)

    def expired_window(self) -> Row:
        row = self.pending_past_window()
        assert approval_expire(approval_id=row.approval.pk) is True
        return self._expect(row, S.EXPIRED)

    def expired_token(self) -> Row:
        """ISSUED, then the action token expired unredeemed."""
        row = self.issued()
        ActionToken.objects.filter(approval_id=row.approval.pk).update(expires_at=timezone.now() - PAST)
        assert approval_expire(approval_id=row.approval.pk) is True
        return self._expect(row, S.EXPIRED)

    def _cancelled(self, row: Row) -> Row:
        assert approval_cancel(approval_id=row.approval.pk, reason="agent_cancelled") is True
        return self._expect(row, S.CANCELLED)

    def cancelled_pending(self) -> Row:
        return self._cancelled(self.pending())

    def cancelled_approved(self) -> Row:
        return self._cancelled(self.approved())

    def cancelled_issued(self) -> Row:
        return self._cancelled(self.issued())


STATES = [
    "pending",
    "pending_past_window",
    "approved",
    "issued",
    "redeemed",
    "denied",
    "expired_window",
    "expired_token",
    "cancelled_pending",
    "cancelled_approved",
    "cancelled_issued",
]
TERMINAL_STATES = {
    "redeemed",
    "denied",
    "expired_window",
    "expired_token",
    "cancelled_pending",
    "cancelled_approved",
    "cancelled_issued",
}


# --- the transitions: one service call each ------------------------------------------------------


def t_approve(b: Build, row: Row) -> ApprovalRequest:
    return approval_approve(approval_id=row.approval.pk, user=b.s.user, auth=auth_now())


def t_deny(b: Build, row: Row) -> ApprovalRequest:
    return approval_deny(approval_id=row.approval.pk, user=b.s.user, auth=auth_now())


def t_expire_early(b: Build, row: Row) -> bool:
    """The expiry task firing while nothing has timed out yet (a task run early or twice)."""
    return approval_expire(approval_id=row.approval.pk)


def t_expire(b: Build, row: Row) -> bool:
    """Time passes beyond the approval window and the action token's lifetime, then the task runs."""
    past = timezone.now() - PAST
    ApprovalRequest.objects.filter(pk=row.approval.pk).update(expires_at=past)
    ActionToken.objects.filter(approval_id=row.approval.pk).update(expires_at=past)
    return approval_expire(approval_id=row.approval.pk)


def t_cancel(b: Build, row: Row) -> bool:
    return approval_cancel(approval_id=row.approval.pk, reason="agent_cancelled")


def t_collect(b: Build, row: Row) -> dict[str, Any]:
    return approval_collect(auth_req_id=row.auth_req_id, agent=b.s.agent)


def t_redeem(b: Build, row: Row) -> ApprovalRequest:
    # A row that never had a token minted is tried with the jti of a token that was never issued.
    claims = row.claims or {"jti": f"never-issued-{row.approval.pk}"}
    return action_token_redeem(claims=claims, resource_server=b.rs)


# Each returns what its service returns: an approval, True/False or the token response.
TRANSITIONS: dict[str, Callable[[Build, Row], Any]] = {
    "approve": t_approve,
    "deny": t_deny,
    "expire_early": t_expire_early,
    "expire": t_expire,
    "cancel": t_cancel,
    "collect": t_collect,
    "redeem": t_redeem,
}


# --- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    status: str  # the row's status afterwards
    raises: type[Exception] | None = None  # the exception the service must raise
    returns: Any = "approval"  # for non-raising calls: True/False, "approval" or "token"
    events: tuple[str, ...] = ()  # audit events the call appends, in order


def ok(status: str, returns: object = "approval", *events: str) -> Expect:
    return Expect(status, None, returns, tuple(events))


def no(status: str, exc: type[Exception], *events: str) -> Expect:
    return Expect(status, exc, None, tuple(events))


def unchanged_for(state: str) -> str:
    return {
        "pending": S.PENDING,
        "pending_past_window": S.PENDING,
        "approved": S.APPROVED,
        "issued": S.ISSUED,
        "redeemed": S.REDEEMED,
        "denied": S.DENIED,
        "expired_window": S.EXPIRED,
        "expired_token": S.EXPIRED,
        "cancelled_pending": S.CANCELLED,
        "cancelled_approved": S.CANCELLED,
        "cancelled_issued": S.CANCELLED,
    }[state]


TABLE: dict[tuple[str, str], Expect] = {}
for _state in STATES:
    _same = unchanged_for(_state)
    # Only a PENDING row inside its window can be decided.
    TABLE[_state, "approve"] = no(_same, ApprovalNotPending)
    TABLE[_state, "deny"] = no(_same, ApprovalNotPending)
    # Nothing has timed out: the expiry task changes nothing ...
    TABLE[_state, "expire_early"] = ok(_same, False)
    # ... and once time has passed, only PENDING and an unredeemed ISSUED expire.
    TABLE[_state, "expire"] = ok(_same, False)
    # Cancelling ends any open request; a terminal one stays as it is.
    TABLE[_state, "cancel"] = ok(_same, False)
    # The agent's poll (CIBA §11).
    TABLE[_state, "collect"] = no(_same, InvalidGrant)
    # Redemption needs an issued, unexpired, unredeemed token.
    TABLE[_state, "redeem"] = no(_same, InvalidToken)

TABLE.update(
    {
        ("pending", "approve"): ok(S.APPROVED, "approval", "approval.approved"),
        ("pending", "deny"): ok(S.DENIED, "approval", "approval.denied"),
        ("pending_past_window", "expire_early"): ok(S.EXPIRED, True, "approval.expired"),
        ("pending", "expire"): ok(S.EXPIRED, True, "approval.expired"),
        ("pending_past_window", "expire"): ok(S.EXPIRED, True, "approval.expired"),
        ("issued", "expire"): ok(S.EXPIRED, True, "approval.expired"),
        ("pending", "cancel"): ok(S.CANCELLED, True, "approval.cancelled"),
        ("pending_past_window", "cancel"): ok(S.CANCELLED, True, "approval.cancelled"),
        ("approved", "cancel"): ok(S.CANCELLED, True, "approval.cancelled"),
        ("issued", "cancel"): ok(S.CANCELLED, True, "approval.cancelled"),
        ("pending", "collect"): no(S.PENDING, AuthorizationPending),
        ("pending_past_window", "collect"): no(S.EXPIRED, ExpiredToken, "approval.expired"),
        ("approved", "collect"): ok(S.ISSUED, "token", "action_token.issued"),
        ("denied", "collect"): no(S.DENIED, AccessDenied),
        ("expired_window", "collect"): no(S.EXPIRED, ExpiredToken),
        ("expired_token", "collect"): no(S.EXPIRED, ExpiredToken),
        ("cancelled_pending", "collect"): no(S.CANCELLED, AccessDenied),
        ("cancelled_approved", "collect"): no(S.CANCELLED, AccessDenied),
        ("cancelled_issued", "collect"): no(S.CANCELLED, AccessDenied),
        ("issued", "redeem"): ok(S.REDEEMED, "approval", "action_token.redeemed"),
    }
)


def test_the_table_covers_every_pair_exactly() -> None:
    assert set(TABLE) == set(itertools.product(STATES, TRANSITIONS))


def test_the_table_and_the_model_describe_one_graph() -> None:
    # Every change of state the services make here is an edge of ApprovalRequest.EDGES (the graph
    # the services take their guards from), and every edge is made somewhere in the table.
    edges = {(src, dst) for sources, dst in ApprovalRequest.EDGES.values() for src in sources}
    made = {
        (unchanged_for(state), expect.status)
        for (state, _), expect in TABLE.items()
        if expect.status != unchanged_for(state)
    }
    assert made <= edges, made - edges
    assert edges <= made, edges - made
    assert all(dst not in ApprovalRequest.OPEN for dst in ApprovalRequest.TERMINAL)
    assert not any(
        src in ApprovalRequest.TERMINAL for sources, _ in ApprovalRequest.EDGES.values() for src in sources
    )


def test_an_auto_approved_request_takes_the_approve_edge(
    scenario: Scenario, ledger_policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The policy's rule approves through the same guarded edge as the user (approvals.services).
    from consent.services import scope_set

    install_outbox(monkeypatch)
    scope_set(name="ledger:write", values={"auto_approve_rule": "amount <= 10000"})
    approval, created = request_approval(session_grant(scenario))
    row = ApprovalRequest.objects.get(pk=approval.pk)
    assert created and row.status == S.APPROVED and row.decision_method == "auto_rule"
    assert row.decision_auth == {"rule": "amount <= 10000"} and row.decided_at is not None
    events = list(
        AuditEvent.objects.filter(grant_id=str(row.grant_id)).order_by("id").values_list("event", flat=True)
    )
    assert events[-2:] == ["approval.requested", "approval.auto_approved"]


# --- the test ----------------------------------------------------------------------------------------


def _head() -> int:
    return AuditEvent.objects.aggregate(m=Max("id"))["m"] or 0


def _decision(approval_id: uuid.UUID) -> dict[str, Any]:
    row = ApprovalRequest.objects.get(pk=approval_id)
    return {
        "status": row.status,
        "decided_at": row.decided_at,
        "decided_by": row.decided_by_id,
        "decision_method": row.decision_method,
        "decision_auth": row.decision_auth,
    }


def _tokens(approval_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return list(
        ActionToken.objects.filter(approval_id=approval_id).values_list(
            "jti", "redeemed_at", "redeemed_by_id"
        )
    )


@pytest.mark.parametrize("state,transition", list(itertools.product(STATES, TRANSITIONS)))
def test_transition(
    state: str,
    transition: str,
    scenario: Scenario,
    ledger_policy: ScopePolicy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_outbox(monkeypatch)
    build = Build(scenario)
    row = getattr(build, state)()
    expect = TABLE[state, transition]
    decision_before, tokens_before, seq = _decision(row.approval.pk), _tokens(row.approval.pk), _head()

    if expect.raises is not None:
        with pytest.raises(expect.raises):
            TRANSITIONS[transition](build, row)
    else:
        result = TRANSITIONS[transition](build, row)
        if expect.returns == "approval":
            assert isinstance(result, ApprovalRequest) and result.pk == row.approval.pk
            assert result.status == expect.status
        elif expect.returns == "token":
            claims = verify(result["access_token"], typ=ACTION_TOKEN_TYP)
            assert claims["approval_id"] == str(row.approval.pk)
        else:
            assert result is expect.returns

    assert row.fresh().status == expect.status
    new_events = list(AuditEvent.objects.filter(id__gt=seq).order_by("id").values_list("event", flat=True))
    assert tuple(new_events) == expect.events

    tokens_after = _tokens(row.approval.pk)
    assert len(tokens_after) <= 1, "one approval mints at most one action token"
    if expect.events == ("action_token.issued",):
        assert len(tokens_after) == 1 and tokens_before == []
    elif expect.events == ("action_token.redeemed",):
        assert tokens_after[0][1] is not None and tokens_before[0][1] is None
    else:
        assert tokens_after == tokens_before, "no token minted or redeemed by a refused transition"

    if state in TERMINAL_STATES:
        # Terminal states never change: not the status, not the decision record, not the token.
        assert _decision(row.approval.pk) == decision_before
        assert tokens_after == tokens_before
        assert new_events == []


def test_a_decision_records_who_and_how(
    scenario: Scenario, ledger_policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_outbox(monkeypatch)
    build = Build(scenario)
    row = build.pending()
    auth = auth_now(("pwd", "otp"))
    approval_approve(approval_id=row.approval.pk, user=scenario.user, auth=auth)
    approval = row.fresh()
    assert approval.decided_by_id == scenario.user.pk and approval.decision_method == "browser"
    assert approval.decision_auth == {
        "auth_time": int(auth.auth_time.timestamp()),
        "amr": ["pwd", "otp"],
        "acr": "",
    }
    assert approval.decided_at is not None


def test_only_the_owner_can_decide(
    scenario: Scenario,
    ledger_policy: ScopePolicy,
    monkeypatch: pytest.MonkeyPatch,
    django_user_model: type[User],
) -> None:
    from approvals.errors import ApprovalNotFound

    install_outbox(monkeypatch)
    build = Build(scenario)
    row = build.pending()
    other = django_user_model.objects.create_user("mallory", password="another strong passphrase")
    for decide in (approval_approve, approval_deny):
        with pytest.raises(ApprovalNotFound):
            decide(approval_id=row.approval.pk, user=other, auth=auth_now())
    assert _decision(row.approval.pk)["status"] == S.PENDING and row.fresh().decided_by_id is None


def test_a_second_poll_of_a_pending_request_is_slow_down(
    scenario: Scenario, ledger_policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from approvals.errors import SlowDown

    install_outbox(monkeypatch)
    build = Build(scenario)
    row = build.pending()
    with pytest.raises(AuthorizationPending):
        approval_collect(auth_req_id=row.auth_req_id, agent=scenario.agent)
    with pytest.raises(SlowDown):
        approval_collect(auth_req_id=row.auth_req_id, agent=scenario.agent)
    assert row.fresh().status == S.PENDING and row.fresh().interval == 10

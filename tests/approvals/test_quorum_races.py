"""Two-person approval under races, on PostgreSQL with real threads (as test_concurrency).

Two approvers casting the last vote at once, approve against deny, a vote against a cancellation,
and an approver removed from the group while the prompt waits: one terminal state, at most one
action token, every step audited once.
"""

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection

from approvals.errors import ApprovalNotPending, InvalidGrant
from approvals.models import ActionToken, ApprovalRequest, ApprovalVote
from approvals.services import approval_approve, approval_cancel, approval_collect, approval_deny
from audit.models import AuditEvent
from consent.keys import active_signing_key
from consent.models import ScopePolicy, SessionGrant
from tests.approvals.quorum_support import Officials, officials, require_quorum
from tests.approvals.support import (
    auth_now,
    auth_req_id,
    errors,
    install_outbox,
    ledger_entry,
    race,
    request_approval,
    session_grant,
    wins,
)
from tests.conftest import Scenario

pytestmark = pytest.mark.django_db(transaction=True)

S = ApprovalRequest.Status


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail("race tests need PostgreSQL row locking: set DATABASE_URL=postgres://...")


@pytest.fixture
def people(scenario: Scenario, ledger_policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch) -> Officials:
    install_outbox(monkeypatch, run_pushes=False)
    active_signing_key()
    found = officials()
    found.carol.groups.add(found.group)  # three officials, two approvals needed
    require_quorum(found.group)
    return found


@pytest.fixture
def grant(scenario: Scenario, people: Officials) -> SessionGrant:
    return session_grant(scenario)


def events_for(approval: ApprovalRequest, *names: str) -> list[str]:
    return list(
        AuditEvent.objects.filter(event__in=names, detail__approval_id=str(approval.pk))
        .order_by("id")
        .values_list("event", flat=True)
    )


def test_two_first_votes_at_once_both_count_and_approve_once(grant: SessionGrant, people: Officials) -> None:
    for n in range(5):
        approval, _ = request_approval(grant, [ledger_entry(f"{20000 + n}.00")])
        voters = [people.alice, people.bob]
        results = race(
            2, lambda i, a=approval, v=voters: approval_approve(approval_id=a.pk, user=v[i], auth=auth_now())
        )
        assert len(wins(results)) == 2, errors(results)
        assert ApprovalRequest.objects.get(pk=approval.pk).status == S.APPROVED
        assert ApprovalVote.objects.filter(approval=approval).count() == 2
        assert events_for(approval, "approval.vote", "approval.approved") == [
            "approval.vote",
            "approval.vote",
            "approval.approved",
        ]


def test_two_approvers_casting_the_last_vote_at_once_one_wins_one_token(
    grant: SessionGrant, scenario: Scenario, people: Officials
) -> None:
    for n in range(5):
        approval, _ = request_approval(grant, [ledger_entry(f"{30000 + n}.00")])
        approval_approve(approval_id=approval.pk, user=people.alice, auth=auth_now())
        last = [people.bob, people.carol]
        results = race(
            2, lambda i, a=approval, v=last: approval_approve(approval_id=a.pk, user=v[i], auth=auth_now())
        )
        assert len(wins(results)) == 1, f"round {n}: {len(wins(results))} last votes were taken"
        assert all(isinstance(e, ApprovalNotPending) for e in errors(results)), errors(results)
        assert ApprovalRequest.objects.get(pk=approval.pk).status == S.APPROVED
        assert ApprovalVote.objects.filter(approval=approval).count() == 2  # the loser left no vote
        assert events_for(approval, "approval.approved") == ["approval.approved"]
        collected = race(
            4, lambda i, a=approval: approval_collect(auth_req_id=auth_req_id(a), agent=scenario.agent)
        )
        assert len(wins(collected)) == 1 and all(isinstance(e, InvalidGrant) for e in errors(collected))
        assert ActionToken.objects.filter(approval=approval).count() == 1
        claims_approvers = ApprovalRequest.objects.get(pk=approval.pk).decision_auth["approvers"]
        assert len(claims_approvers) == 2 and claims_approvers[0]["sub"] == f"user:{people.alice.pk}"


def test_the_last_approval_racing_a_denial_ends_in_one_decision(
    grant: SessionGrant, people: Officials
) -> None:
    for n in range(10):
        approval, _ = request_approval(grant, [ledger_entry(f"{40000 + n}.00")])
        approval_approve(approval_id=approval.pk, user=people.alice, auth=auth_now())
        moves = [(approval_approve, people.bob), (approval_deny, people.carol)]

        def decide(
            i: int, a: ApprovalRequest = approval, moves: list[tuple[Callable[..., Any], User]] = moves
        ) -> tuple[str, Any]:
            fn, user = moves[i]
            return fn.__name__, fn(approval_id=a.pk, user=user, auth=auth_now())

        results = race(2, decide)
        won = wins(results)
        assert len(won) == 1, f"round {n}: both decided"
        assert all(isinstance(e, ApprovalNotPending) for e in errors(results)), errors(results)
        expected = S.APPROVED if won[0][0] == "approval_approve" else S.DENIED
        assert ApprovalRequest.objects.get(pk=approval.pk).status == expected
        assert events_for(approval, "approval.approved", "approval.denied") == [f"approval.{expected}"]


def test_the_last_vote_racing_a_cancellation_ends_in_one_state(
    grant: SessionGrant, people: Officials
) -> None:
    for n in range(10):
        approval, _ = request_approval(grant, [ledger_entry(f"{50000 + n}.00")])
        approval_approve(approval_id=approval.pk, user=people.alice, auth=auth_now())

        def act(i: int, a: ApprovalRequest = approval) -> object:
            if i == 0:
                return approval_approve(approval_id=a.pk, user=people.bob, auth=auth_now()).status
            return approval_cancel(approval_id=a.pk, reason="agent_cancelled")

        results = race(2, act)
        vote, cancel = results
        assert cancel == ("ok", True)  # cancelling leaves PENDING and APPROVED alike
        assert ApprovalRequest.objects.get(pk=approval.pk).status == S.CANCELLED
        ended = events_for(approval, "approval.approved", "approval.cancelled")
        if vote[0] == "ok":  # the quorum was met first, then the approved request was cancelled
            assert ended == ["approval.approved", "approval.cancelled"], f"round {n}: {ended}"
            assert ApprovalVote.objects.filter(approval=approval).count() == 2
        else:
            assert isinstance(vote[1], ApprovalNotPending), vote
            assert ended == ["approval.cancelled"], f"round {n}: {ended}"
            assert ApprovalVote.objects.filter(approval=approval).count() == 1
        assert not ActionToken.objects.filter(approval=approval).exists()


def test_an_approver_removed_while_the_prompt_waits_no_longer_counts(
    grant: SessionGrant, people: Officials
) -> None:
    approval, _ = request_approval(grant, [ledger_entry("60000.00")])
    approval_approve(approval_id=approval.pk, user=people.alice, auth=auth_now())

    def remove() -> None:  # another connection, committed, as an administrator's change would be
        try:
            people.alice.groups.remove(people.group)
        finally:
            connection.close()

    thread = threading.Thread(target=remove)
    thread.start()
    thread.join(timeout=60)
    results = race(1, lambda i: approval_approve(approval_id=approval.pk, user=people.bob, auth=auth_now()))
    assert wins(results), errors(results)
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING
    results = race(1, lambda i: approval_approve(approval_id=approval.pk, user=people.carol, auth=auth_now()))
    row = ApprovalRequest.objects.get(pk=approval.pk)
    assert row.status == S.APPROVED
    assert [a["sub"] for a in row.decision_auth["approvers"]] == [
        f"user:{people.bob.pk}",
        f"user:{people.carol.pk}",
    ]

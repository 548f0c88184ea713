"""The losers of a redemption race are refused from memory, and nothing else is.

``approvals.redemption.action_token_spend`` answers an attempt that repeats one this process
has just seen redeemed without verifying the token or asking the database, and lets the same
attempt arriving while one is being decided wait for its outcome. Exactly-once stays decided by
the one conditional UPDATE: these tests show the memory refuses only what that statement would
refuse as already redeemed, and that every other attempt still reaches the statement.
"""

import threading
from typing import Any

import pytest
from django.db import connection
from pytest_django import DjangoAssertNumQueries

from approvals import redemption
from approvals.errors import ActionMismatch, AlreadyRedeemed
from approvals.models import ActionToken, ApprovalRequest
from approvals.redemption import action_token_spend
from approvals.services import approval_approve, approval_collect
from audit.models import AuditEvent
from consent.keys import active_signing_key
from consent.models import ResourceServer, SessionGrant
from tests.approvals.support import (
    Outbox,
    auth_now,
    auth_req_id,
    install_outbox,
    ledger_entry,
    ledger_rs,
    request_approval,
    session_grant,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> Outbox:
    return install_outbox(monkeypatch, run_pushes=False)


@pytest.fixture
def grant(scenario: Any, ledger_policy: Any, outbox: Outbox) -> SessionGrant:
    active_signing_key()
    return session_grant(scenario)


def issued_token(grant: SessionGrant, scenario: Any, amount: str) -> tuple[ApprovalRequest, str]:
    approval, _ = request_approval(grant, [ledger_entry(amount)])
    approval_approve(approval_id=approval.pk, user=scenario.user, auth=auth_now())
    body = approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent)
    return approval, str(body["access_token"])


def spend(token: str, rs: ResourceServer, request_hash: str = "") -> dict[str, Any]:
    claims: dict[str, Any] = {}
    action_token_spend(token=token, resource_server=rs, request_hash=request_hash, claims=claims)
    return claims


def race_spend(token: str, rs: ResourceServer, n: int) -> list[object]:
    """``n`` threads released together, each spending the same token: the claims or the refusal."""
    barrier = threading.Barrier(n)
    outcomes: list[object] = [None] * n

    def attempt(i: int) -> None:
        try:
            connection.ensure_connection()
            barrier.wait(timeout=60)
            outcomes[i] = spend(token, rs)
        except BaseException as exc:  # noqa: BLE001 - every outcome is inspected by the test
            outcomes[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "an attempt never finished"
    return outcomes


def redeemed_events(approval: ApprovalRequest) -> int:
    return AuditEvent.objects.filter(
        event="action_token.redeemed", detail__approval_id=str(approval.pk)
    ).count()


def test_concurrent_attempts_through_the_endpoint_path_redeem_exactly_once(
    grant: SessionGrant, scenario: Any
) -> None:
    rs = ledger_rs(scenario)
    for n in range(5):
        approval, token = issued_token(grant, scenario, f"{n + 700}.00")
        outcomes = race_spend(token, rs, 12)
        won = [o for o in outcomes if isinstance(o, dict)]
        lost = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(won) == 1, outcomes
        assert len(lost) == 11 and all(isinstance(e, AlreadyRedeemed) for e in lost), lost
        assert ActionToken.objects.get(approval_id=approval.pk).redeemed_at is not None
        assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.Status.REDEEMED
        assert redeemed_events(approval) == 1


def test_a_repeated_attempt_is_refused_without_a_statement_and_names_the_owner(
    grant: SessionGrant, scenario: Any, django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    rs = ledger_rs(scenario)
    approval, token = issued_token(grant, scenario, "801.00")
    won = spend(token, rs)
    claims: dict[str, Any] = {}
    with django_assert_num_queries(0), pytest.raises(AlreadyRedeemed):
        action_token_spend(token=token, resource_server=rs, request_hash="", claims=claims)
    assert claims["jti"] == won["jti"] and claims["sub"] == f"user:{scenario.user.pk}"
    assert redeemed_events(approval) == 1


def test_a_different_action_hash_is_not_answered_from_memory(grant: SessionGrant, scenario: Any) -> None:
    rs = ledger_rs(scenario)
    _, token = issued_token(grant, scenario, "802.00")
    spend(token, rs)
    with pytest.raises(ActionMismatch):
        spend(token, rs, request_hash="not-the-approved-action")


def test_after_the_memory_window_the_database_decides_again(
    grant: SessionGrant, scenario: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rs = ledger_rs(scenario)
    _, token = issued_token(grant, scenario, "803.00")
    monkeypatch.setattr(redemption, "SPENT_SECONDS", 0.0)
    spend(token, rs)
    with pytest.raises(AlreadyRedeemed):
        spend(token, rs)  # refused by the statement this time: the memory kept nothing


def test_an_attempt_whose_twin_did_not_redeem_decides_on_its_own(grant: SessionGrant, scenario: Any) -> None:
    rs = ledger_rs(scenario)
    approval, token = issued_token(grant, scenario, "804.00")
    attempt = (token, rs.pk, rs.client_secret, "")
    twin, leads = redemption._FLIGHTS.join(attempt)
    assert leads
    follower: list[object] = []

    def follow() -> None:
        try:
            follower.append(spend(token, rs))
        finally:
            connection.close()

    t = threading.Thread(target=follow)
    t.start()
    redemption._FLIGHTS.land(attempt, twin)  # the twin ended without redeeming
    t.join(timeout=60)
    assert len(follower) == 1 and isinstance(follower[0], dict)
    assert redeemed_events(approval) == 1

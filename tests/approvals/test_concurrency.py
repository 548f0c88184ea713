"""Races on PostgreSQL: real threads, each with its own database connection.

SECURITY.md: "Two concurrent approves, or approve racing deny -> exactly one terminal
state and at most one action token"; "Exactly one success per action token, under any
concurrency"; identical pending requests collapse into one, even under a race.

Rows are committed (``transaction=True``) so every thread sees them. Threads line up
on a ``threading.Barrier`` and then make one service call each; the conditional
UPDATE (or unique index) must decide who wins. Every thread closes its connection.
"""

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test import Client
from pytest_django import DjangoAssertNumQueries

from approvals import redemption
from approvals.errors import (
    AccessDenied,
    ActionMismatch,
    AlreadyRedeemed,
    ApprovalNotPending,
    InvalidGrant,
    InvalidToken,
)
from approvals.models import ActionToken, ApprovalRequest
from approvals.redemption import action_token_redeem, action_token_spend
from approvals.services import (
    approval_approve,
    approval_cancel,
    approval_collect,
    approval_deny,
    approval_request_create,
    auth_req_id_hash,
)
from audit.models import AuditEvent
from consent.keys import active_signing_key
from consent.models import ResourceServer, ScopePolicy, SessionGrant
from consent.tokens import ACTION_TOKEN_TYP, verify
from tests.approvals.conftest import LEDGER_ENTRY
from tests.approvals.support import (
    Outbox,
    auth_now,
    auth_req_id,
    backchannel_request,
    errors,
    install_outbox,
    ledger_entry,
    ledger_rs,
    race,
    request_approval,
    session_grant,
    wins,
)
from tests.conftest import ClientResponse, OAuthFlow, Scenario, basic

pytestmark = pytest.mark.django_db(transaction=True)

S = ApprovalRequest.Status


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail(
            "concurrency tests need PostgreSQL row locking: set DATABASE_URL=postgres://... (make test)"
        )


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> Outbox:
    # Record what would be queued on commit; nothing reaches Redis or a worker.
    return install_outbox(monkeypatch, run_pushes=False)


@pytest.fixture
def grant(scenario: Scenario, ledger_policy: ScopePolicy, outbox: Outbox) -> SessionGrant:
    active_signing_key()  # created up front, so no thread races to create the first key
    return session_grant(scenario)


def events_for(approval_id: object, *names: str) -> list[str]:
    return list(
        AuditEvent.objects.filter(event__in=names, detail__approval_id=str(approval_id))
        .order_by("id")
        .values_list("event", flat=True)
    )


# --- (a) concurrent approves -----------------------------------------------------------------------


@pytest.mark.parametrize("round_", range(5))
def test_eight_concurrent_approves_exactly_one_wins(
    grant: SessionGrant, scenario: Scenario, round_: int
) -> None:
    approval, _ = request_approval(grant, [ledger_entry(f"{round_ + 1}.00")])
    results = race(
        8, lambda i: approval_approve(approval_id=approval.pk, user=scenario.user, auth=auth_now())
    )
    assert len(wins(results)) == 1, f"{len(wins(results))} threads approved the same request"
    assert all(isinstance(e, ApprovalNotPending) for e in errors(results)), errors(results)
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.APPROVED
    assert events_for(approval.pk, "approval.approved") == ["approval.approved"]


# --- (b) approve racing deny -------------------------------------------------------------------------


def test_approve_racing_deny_ends_in_exactly_one_decision(grant: SessionGrant, scenario: Scenario) -> None:
    for n in range(20):
        approval, _ = request_approval(grant, [ledger_entry(f"{n + 100}.00")])
        deciders = [approval_approve, approval_deny, approval_approve, approval_deny]

        def decide(
            i: int, deciders: list[Callable[..., Any]] = deciders, approval_id: uuid.UUID = approval.pk
        ) -> tuple[str, Any]:
            return deciders[i].__name__, deciders[i](
                approval_id=approval_id, user=scenario.user, auth=auth_now()
            )

        results = race(4, decide)
        won = wins(results)
        assert len(won) == 1, f"round {n}: {[name for name, _ in won]} all succeeded"
        assert all(isinstance(e, ApprovalNotPending) for e in errors(results)), errors(results)
        winner = won[0][0]
        expected = S.APPROVED if winner == "approval_approve" else S.DENIED
        row = ApprovalRequest.objects.get(pk=approval.pk)
        assert row.status == expected, f"round {n}: {winner} won but the row says {row.status}"
        decisions = events_for(approval.pk, "approval.approved", "approval.denied")
        assert decisions == [f"approval.{expected}"], f"round {n}: audit shows {decisions}"

        # The agent polls: a token only if the one decision was approve, and at most one.
        try:
            approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent)
        except AccessDenied:
            assert expected == S.DENIED
        else:
            assert expected == S.APPROVED
        assert ActionToken.objects.filter(approval_id=approval.pk).count() == (
            1 if expected == S.APPROVED else 0
        )


# --- (c) concurrent collectors -----------------------------------------------------------------------


@pytest.mark.parametrize("round_", range(5))
def test_eight_concurrent_collects_mint_exactly_one_token(
    grant: SessionGrant, scenario: Scenario, round_: int
) -> None:
    approval, _ = request_approval(grant, [ledger_entry(f"{round_ + 200}.00")])
    approval_approve(approval_id=approval.pk, user=scenario.user, auth=auth_now())
    results = race(8, lambda i: approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent))
    tokens = wins(results)
    assert len(tokens) == 1, f"{len(tokens)} action tokens handed out for one approval"
    assert all(isinstance(e, InvalidGrant) for e in errors(results)), errors(results)
    claims = verify(tokens[0]["access_token"], typ=ACTION_TOKEN_TYP)
    assert list(ActionToken.objects.filter(approval_id=approval.pk).values_list("jti", flat=True)) == [
        claims["jti"]
    ]
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.ISSUED
    assert events_for(approval.pk, "action_token.issued") == ["action_token.issued"]


# --- (d) concurrent redeemers ------------------------------------------------------------------------


def test_sixteen_concurrent_redemptions_exactly_one_per_token(
    grant: SessionGrant, scenario: Scenario
) -> None:
    rs = ledger_rs(scenario)
    issued: list[tuple[ApprovalRequest, dict[str, Any]]] = []
    for n in range(10):
        approval, _ = request_approval(grant, [ledger_entry(f"{n + 300}.00")])
        approval_approve(approval_id=approval.pk, user=scenario.user, auth=auth_now())
        body = approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent)
        issued.append((approval, verify(body["access_token"], typ=ACTION_TOKEN_TYP)))

    for approval, claims in issued:
        results = race(16, lambda i, claims=claims: action_token_redeem(claims=claims, resource_server=rs))
        assert len(wins(results)) == 1, f"token {claims['jti']} redeemed {len(wins(results))} times"
        assert all(isinstance(e, InvalidToken) for e in errors(results)), errors(results)
        assert all(isinstance(e, AlreadyRedeemed) for e in errors(results)), [str(e) for e in errors(results)]
        token = ActionToken.objects.get(jti=claims["jti"])
        assert token.redeemed_at is not None and token.redeemed_by_id == rs.pk
        assert ApprovalRequest.objects.get(pk=approval.pk).status == S.REDEEMED
        assert events_for(approval.pk, "action_token.redeemed") == ["action_token.redeemed"]


# --- (d2) the redemption endpoint's path: race losers refused from memory ---------------------------
#
# ``approvals.redemption.action_token_spend`` answers an attempt that repeats one this process has
# just seen redeemed without verifying the token or asking the database, and lets the same attempt
# arriving while one is being decided wait for its outcome. Exactly-once stays decided by the one
# conditional UPDATE: the memory refuses only what that statement would refuse as already redeemed,
# and every other attempt still reaches the statement.


def issued_token(grant: SessionGrant, scenario: Scenario, amount: str) -> tuple[ApprovalRequest, str]:
    approval, _ = request_approval(grant, [ledger_entry(amount)])
    approval_approve(approval_id=approval.pk, user=scenario.user, auth=auth_now())
    body = approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent)
    return approval, str(body["access_token"])


def spend(token: str, rs: ResourceServer, request_hash: str = "") -> dict[str, Any]:
    claims: dict[str, Any] = {}
    action_token_spend(token=token, resource_server=rs, request_hash=request_hash, claims=claims)
    return claims


def redeemed_events(approval: ApprovalRequest) -> int:
    return AuditEvent.objects.filter(
        event="action_token.redeemed", detail__approval_id=str(approval.pk)
    ).count()


def test_concurrent_attempts_through_the_endpoint_path_redeem_exactly_once(
    grant: SessionGrant, scenario: Scenario
) -> None:
    rs = ledger_rs(scenario)
    for n in range(5):
        approval, token = issued_token(grant, scenario, f"{n + 700}.00")
        results = race(12, lambda i, token=token: spend(token, rs))
        assert len(wins(results)) == 1, results
        assert all(isinstance(e, AlreadyRedeemed) for e in errors(results)), errors(results)
        assert ActionToken.objects.get(approval_id=approval.pk).redeemed_at is not None
        assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.Status.REDEEMED
        assert redeemed_events(approval) == 1


def test_a_repeated_attempt_is_refused_without_a_statement_and_names_the_owner(
    grant: SessionGrant, scenario: Scenario, django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    rs = ledger_rs(scenario)
    approval, token = issued_token(grant, scenario, "801.00")
    won = spend(token, rs)
    claims: dict[str, Any] = {}
    with django_assert_num_queries(0), pytest.raises(AlreadyRedeemed):
        action_token_spend(token=token, resource_server=rs, request_hash="", claims=claims)
    assert claims["jti"] == won["jti"] and claims["sub"] == f"user:{scenario.user.pk}"
    assert redeemed_events(approval) == 1


def test_a_different_action_hash_is_not_answered_from_memory(grant: SessionGrant, scenario: Scenario) -> None:
    rs = ledger_rs(scenario)
    _, token = issued_token(grant, scenario, "802.00")
    spend(token, rs)
    with pytest.raises(ActionMismatch):
        spend(token, rs, request_hash="not-the-approved-action")


def test_after_the_memory_window_the_database_decides_again(
    grant: SessionGrant, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    rs = ledger_rs(scenario)
    _, token = issued_token(grant, scenario, "803.00")
    monkeypatch.setattr(redemption, "SPENT_SECONDS", 0.0)
    spend(token, rs)
    with pytest.raises(AlreadyRedeemed):
        spend(token, rs)  # refused by the statement this time: the memory kept nothing


def test_an_attempt_whose_twin_did_not_redeem_decides_on_its_own(
    grant: SessionGrant, scenario: Scenario
) -> None:
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


# --- (e) identical CIBA requests at the same moment ----------------------------------------------------


def test_two_concurrent_identical_requests_make_one_approval(grant: SessionGrant, outbox: Outbox) -> None:
    for n in range(10):
        req = backchannel_request(grant, [ledger_entry(f"{n + 400}.00")])
        results = race(2, lambda i, req=req: approval_request_create(req=req))
        assert errors(results) == [], errors(results)
        (first, first_created), (second, second_created) = wins(results)
        assert first.pk == second.pk
        assert auth_req_id(first) == auth_req_id(second)
        assert sorted([first_created, second_created]) == [False, True]
        assert ApprovalRequest.objects.filter(action_hash=req.action_hash).count() == 1
        assert events_for(first.pk, "approval.requested") == ["approval.requested"]
        assert outbox.queued_for(first.pk, "deliver_prompt") == ["deliver_prompt"]
        approval_cancel(approval_id=first.pk, reason="agent_cancelled")  # stay under the pending caps


def test_two_concurrent_identical_requests_over_http_get_the_same_auth_req_id(
    scenario: Scenario, ledger_policy: ScopePolicy, outbox: Outbox, flow: OAuthFlow
) -> None:
    session_token = flow.full()["access_token"]
    flow.client.logout()
    active_signing_key()
    for n in range(5):
        data = urlencode(
            {
                "scope": "ledger:write",
                "login_hint_token": session_token,
                "authorization_details": json.dumps([{**LEDGER_ENTRY, "amount": f"{n + 500}.00"}]),
            }
        )

        def ask(i: int, data: str = data) -> ClientResponse:
            return Client().post(
                "/o/bc-authorize/",
                data,
                content_type="application/x-www-form-urlencoded",
                HTTP_AUTHORIZATION=basic(scenario.agent.client_id, scenario.agent_secret),
            )

        results = race(2, ask)
        assert errors(results) == [], errors(results)
        responses = wins(results)
        assert [r.status_code for r in responses] == [200, 200], [r.content for r in responses]
        ids = {r.json()["auth_req_id"] for r in responses}
        assert len(ids) == 1
        approval = ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(ids.pop()))
        assert ApprovalRequest.objects.filter(action_hash=approval.action_hash).count() == 1
        assert events_for(approval.pk, "approval.requested") == ["approval.requested"]
        approval_cancel(approval_id=approval.pk, reason="agent_cancelled")

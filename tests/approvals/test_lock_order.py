"""Revoking a grant while its user decides its prompts never deadlocks (PostgreSQL).

``grant_revoke`` locks the grant, then cancels each open approval (locking each);
a decision locks its approval and, for a grant extension, the grant. Both audit
what they did. Every lock must be taken in one global order (grant before approval,
and no shared audit row at all), or PostgreSQL aborts one side with "deadlock
detected". Real threads, each with its own connection, released together, many rounds.
"""

import random
from collections.abc import Callable

import pytest
from django.db import DatabaseError, connection
from pytest_django import Settings

from approvals import rar
from approvals.ciba import EXTEND_SCOPE, BackchannelRequest
from approvals.errors import ApprovalNotPending
from approvals.models import ApprovalRequest
from approvals.services import approval_approve, approval_deny, approval_request_create
from audit.services import audit_seal_all
from consent.keys import active_signing_key
from consent.models import ScopePolicy, SessionGrant
from consent.services import grant_revoke
from tests.approvals.support import (
    auth_now,
    install_outbox,
    ledger_entry,
    race,
    request_approval,
    session_grant,
)
from tests.audit.test_chain import verified
from tests.conftest import Scenario

pytestmark = pytest.mark.django_db(transaction=True)

S = ApprovalRequest.Status
ROUNDS = 12


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail(
            "lock-order tests need PostgreSQL row locking: set DATABASE_URL=postgres://... (make test)"
        )


def _extension(grant: SessionGrant, seconds: int) -> ApprovalRequest:
    details = [{"type": "grant_extension", "seconds": seconds}]
    approval, created = approval_request_create(
        req=BackchannelRequest(
            agent=grant.agent,
            grant=grant,
            scope=EXTEND_SCOPE,
            system="this connection",
            auto_approve_rule="",
            authorization_details=details,
            action_hash=rar.action_hash(details),
            binding_message="",
            window_seconds=600,
            delivery_mode="poll",
            client_notification_token="",
        )
    )
    assert created
    return approval


def test_revoking_a_grant_while_its_prompts_are_decided_never_deadlocks(
    scenario: Scenario, ledger_policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    # Many prompts for one user in a few seconds: past the fatigue cap, which is not under test here.
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "MAX_PROMPTS_PER_USER_IN_WINDOW": 10_000,
        "MAX_PROMPTS_PER_AGENT_IN_WINDOW": 10_000,
    }
    install_outbox(monkeypatch, run_pushes=False)
    active_signing_key()
    rng = random.Random(7)
    for round_ in range(ROUNDS):
        grant = session_grant(scenario)
        approvals = [request_approval(grant, [ledger_entry(f"{round_}.{i}0")])[0] for i in range(3)]
        approvals += [_extension(grant, 3600 + 60 * i) for i in range(2)]
        rng.shuffle(approvals)
        decisions = [rng.choice([approval_approve, approval_deny]) for _ in approvals]

        def call(
            i: int,
            grant: SessionGrant = grant,
            approvals: list[ApprovalRequest] = approvals,
            decisions: list[Callable[..., ApprovalRequest]] = decisions,
        ) -> object:
            if i == len(approvals):
                return grant_revoke(
                    grant_id=grant.pk,
                    reason="revoked_by_user",
                    actor=f"user:{scenario.user.pk}",
                    user=scenario.user,
                )
            return decisions[i](approval_id=approvals[i].pk, user=scenario.user, auth=auth_now())

        results = race(len(approvals) + 1, call)
        failures = [
            exc for kind, exc in results if kind == "error" and not isinstance(exc, ApprovalNotPending)
        ]
        deadlocks = [exc for exc in failures if isinstance(exc, DatabaseError) and "deadlock" in str(exc)]
        assert not deadlocks, f"round {round_}: {deadlocks[0]}"
        assert not failures, f"round {round_}: {failures!r}"
        assert results[-1] == ("ok", True), "the revocation went through"
        assert SessionGrant.objects.get(pk=grant.pk).status == SessionGrant.Status.REVOKED
        for approval, (kind, value), decide in zip(approvals, results, decisions, strict=False):
            status = ApprovalRequest.objects.get(pk=approval.pk).status
            # A denial is final; anything approved or still pending is cancelled by the revocation.
            denied = kind == "ok" and decide is approval_deny
            assert status == (S.DENIED if denied else S.CANCELLED), (round_, kind, value, status)
    audit_seal_all()
    verified()

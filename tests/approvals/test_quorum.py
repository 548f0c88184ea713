"""Two-person approval: a policy asks for N approvals from a group's members (approvals.votes).

Table-driven like test_state_transitions: each case is a list of votes (who, Approve or Deny) on a
25,000 USD ledger entry under "2 approvals from finance, not the requester, when amount > 10000";
the table says the request's status afterwards, the votes on record, and the refusal (if any) of
the last vote, which must change nothing.
"""

import io
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from pytest_django import DjangoCaptureOnCommitCallbacks

from approvals.errors import (
    AlreadyVoted,
    ApprovalNotFound,
    ApprovalNotPending,
    NotAnApprover,
    RequesterExcluded,
)
from approvals.models import ApprovalRequest, ApprovalVote
from approvals.quorum import inbox_prompts
from approvals.services import approval_approve, approval_collect, approval_deny
from audit.models import AuditEvent
from consent.models import ScopePolicy, SessionGrant
from consent.tokens import ACTION_TOKEN_TYP, verify
from tests.approvals.quorum_support import Officials, officials, require_quorum
from tests.approvals.support import (
    Outbox,
    auth_now,
    auth_req_id,
    install_outbox,
    ledger_entry,
    request_approval,
    session_grant,
)
from tests.conftest import Scenario

pytestmark = pytest.mark.django_db

S = ApprovalRequest.Status
BIG = "25000.00"


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> Outbox:
    return install_outbox(monkeypatch)


@pytest.fixture
def people(scenario: Scenario, ledger_policy: ScopePolicy) -> Officials:
    return officials()


@pytest.fixture
def quorum_policy(people: Officials) -> ScopePolicy:
    return require_quorum(people.group)


@pytest.fixture
def grant(scenario: Scenario, quorum_policy: ScopePolicy, outbox: Outbox) -> SessionGrant:
    return session_grant(scenario)


def _who(name: str, scenario: Scenario, people: Officials) -> User:
    user: User = scenario.user if name == "officer" else getattr(people, name)
    return user


def _vote(approval: ApprovalRequest, user: User, edge: str) -> ApprovalRequest:
    decide = approval_approve if edge == "approve" else approval_deny
    return decide(approval_id=approval.pk, user=user, auth=auth_now(("pwd", "otp")))


@dataclass
class Case:
    name: str
    votes: list[tuple[str, str]]
    status: str
    recorded: int
    refused: type[Exception] | None = None


CASES = [
    Case("one approval leaves it pending", [("alice", "approve")], S.PENDING, 1),
    Case("two approvals approve it", [("alice", "approve"), ("bob", "approve")], S.APPROVED, 2),
    Case("one denial denies it", [("alice", "deny")], S.DENIED, 1),
    Case("a denial after one approval denies it", [("alice", "approve"), ("bob", "deny")], S.DENIED, 2),
    Case(
        "the same person twice counts once",
        [("alice", "approve"), ("alice", "approve")],
        S.PENDING,
        1,
        AlreadyVoted,
    ),
    Case(
        "approving after one's own denial is too late",
        [("alice", "deny"), ("alice", "approve")],
        S.DENIED,
        1,
        ApprovalNotPending,
    ),
    Case("the excluded requester may not approve", [("officer", "approve")], S.PENDING, 0, RequesterExcluded),
    Case("nor deny", [("alice", "approve"), ("officer", "deny")], S.PENDING, 1, RequesterExcluded),
    Case("someone outside the group sees nothing", [("carol", "approve")], S.PENDING, 0, ApprovalNotFound),
    Case(
        "a third approval after the quorum is met is refused",
        [("alice", "approve"), ("bob", "approve"), ("alice", "approve")],
        S.APPROVED,
        2,
        ApprovalNotPending,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_vote_transitions(case: Case, grant: SessionGrant, scenario: Scenario, people: Officials) -> None:
    approval, _ = request_approval(grant, [ledger_entry(BIG)])
    *before, last = case.votes
    for name, edge in before:
        _vote(approval, _who(name, scenario, people), edge)
    events = AuditEvent.objects.count()
    if case.refused is None:
        _vote(approval, _who(last[0], scenario, people), last[1])
    else:
        with pytest.raises(case.refused):
            _vote(approval, _who(last[0], scenario, people), last[1])
        assert AuditEvent.objects.count() == events  # the service wrote nothing; the edge audits the refusal
    row = ApprovalRequest.objects.get(pk=approval.pk)
    assert row.status == case.status
    assert ApprovalVote.objects.filter(approval=approval).count() == case.recorded


def test_the_quorum_token_lists_every_approver_with_their_own_sign_in(
    grant: SessionGrant, scenario: Scenario, people: Officials
) -> None:
    approval, _ = request_approval(grant, [ledger_entry(BIG)])
    _vote(approval, people.alice, "approve")
    with pytest.raises(Exception) as pending:
        approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent)
    assert getattr(pending.value, "error", "") == "authorization_pending"
    approval_approve(approval_id=approval.pk, user=people.bob, auth=auth_now(("pwd",)))
    token = approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent)["access_token"]
    claims = verify(token, typ=ACTION_TOKEN_TYP)
    assert [a["sub"] for a in claims["approvers"]] == [f"user:{people.alice.pk}", f"user:{people.bob.pk}"]
    assert [a["amr"] for a in claims["approvers"]] == [["pwd", "otp"], ["pwd"]]
    assert all(isinstance(a["time"], int) and a["auth_time"] for a in claims["approvers"])
    assert claims["sub"] == f"user:{scenario.user.pk}"  # still the person the agent acts for
    assert ActionTokenCount.of(approval) == 1
    trail = list(
        AuditEvent.objects.filter(detail__approval_id=str(approval.pk))
        .order_by("id")
        .values_list("event", flat=True)
    )
    assert trail.count("approval.vote") == 2 and trail.count("approval.approved") == 1


class ActionTokenCount:
    @staticmethod
    def of(approval: ApprovalRequest) -> int:
        from approvals.models import ActionToken

        return ActionToken.objects.filter(approval=approval).count()


def test_below_the_threshold_the_officer_decides_alone(
    grant: SessionGrant, scenario: Scenario, people: Officials
) -> None:
    approval, _ = request_approval(grant, [ledger_entry("4250.00")])
    with pytest.raises(ApprovalNotFound):  # no quorum applies: the group has no say
        _vote(approval, people.alice, "approve")
    _vote(approval, scenario.user, "approve")
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.APPROVED
    assert not ApprovalVote.objects.exists()


def test_an_approver_removed_from_the_group_no_longer_counts(
    grant: SessionGrant, scenario: Scenario, people: Officials
) -> None:
    approval, _ = request_approval(grant, [ledger_entry(BIG)])
    _vote(approval, people.alice, "approve")
    people.alice.groups.remove(people.group)
    _vote(approval, people.bob, "approve")
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING  # alice's approval lapsed
    with pytest.raises(NotAnApprover):
        _vote(approval, people.alice, "approve")
    people.carol.groups.add(people.group)
    _vote(approval, people.carol, "approve")
    row = ApprovalRequest.objects.get(pk=approval.pk)
    assert row.status == S.APPROVED
    assert [a["sub"] for a in row.decision_auth["approvers"]] == [
        f"user:{people.bob.pk}",
        f"user:{people.carol.pk}",
    ]


def test_a_deactivated_approver_no_longer_counts(
    grant: SessionGrant, scenario: Scenario, people: Officials
) -> None:
    approval, _ = request_approval(grant, [ledger_entry(BIG)])
    _vote(approval, people.alice, "approve")
    people.alice.is_active = False
    people.alice.save()
    _vote(approval, people.bob, "approve")
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING


def test_the_requester_counts_when_not_excluded(
    scenario: Scenario, people: Officials, outbox: Outbox
) -> None:
    require_quorum(people.group, exclude_requester=False)
    approval, _ = request_approval(session_grant(scenario), [ledger_entry(BIG)])
    _vote(approval, scenario.user, "approve")
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING
    _vote(approval, people.alice, "approve")
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.APPROVED


def test_an_auto_approve_rule_never_skips_the_quorum(
    scenario: Scenario, people: Officials, outbox: Outbox
) -> None:
    require_quorum(people.group, auto_approve_rule="amount <= 50000")
    grant = session_grant(scenario)
    small, _ = request_approval(grant, [ledger_entry("900.00")])
    big, _ = request_approval(grant, [ledger_entry(BIG)])
    assert ApprovalRequest.objects.get(pk=small.pk).status == S.APPROVED  # the rule, below the threshold
    assert ApprovalRequest.objects.get(pk=big.pk).status == S.PENDING


def test_every_approver_gets_the_prompt_and_the_news(
    grant: SessionGrant,
    scenario: Scenario,
    people: Officials,
    outbox: Outbox,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        approval, _ = request_approval(grant, [ledger_entry(BIG)])
    prompted = sorted(uid for uid, m in outbox.sent if m["type"] == "approval.upsert")
    assert prompted == sorted([scenario.user.pk, people.alice.pk, people.bob.pk])
    for_alice = next(m["prompt"] for uid, m in outbox.sent if uid == people.alice.pk)
    assert for_alice["quorum"]["for_user"] == "officer" and for_alice["quorum"]["can_vote"] is True
    for_officer = next(m["prompt"] for uid, m in outbox.sent if uid == scenario.user.pk)
    assert for_officer["quorum"]["can_vote"] is False  # excluded: sees it wait, cannot answer
    outbox.sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        _vote(approval, people.alice, "approve")
    update = {uid: m["prompt"]["quorum"] for uid, m in outbox.sent if m["type"] == "approval.upsert"}
    assert update[people.alice.pk]["voted"] == "approve" and update[people.alice.pk]["waiting"] == (
        "Waiting for 1 more approval"
    )
    assert update[people.bob.pk]["can_vote"] is True
    outbox.sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        _vote(approval, people.bob, "approve")
    removed = sorted(uid for uid, m in outbox.sent if m["type"] == "approval.remove")
    assert removed == sorted([scenario.user.pk, people.alice.pk, people.bob.pk])


def test_the_inbox_replay_includes_prompts_a_person_may_vote_on(
    grant: SessionGrant, scenario: Scenario, people: Officials
) -> None:
    approval, _ = request_approval(grant, [ledger_entry(BIG)])
    request_approval(grant, [ledger_entry("4250.00")])  # the officer's alone
    assert [p["id"] for p in inbox_prompts(user_id=people.alice.pk)] == [str(approval.pk)]
    assert inbox_prompts(user_id=people.carol.pk) == []
    assert len(inbox_prompts(user_id=scenario.user.pk)) == 2
    people.alice.groups.remove(people.group)
    assert inbox_prompts(user_id=people.alice.pk) == []


# --- the policy ----------------------------------------------------------------------------------


def test_scope_set_takes_the_quorum_flags(people: Officials) -> None:
    call_command(
        "scope_set",
        "ledger:write",
        "--audience",
        "http://ledger.test",
        "--sensitivity",
        "step_up",
        "--quorum",
        "2",
        "--approver-group",
        "finance",
        "--exclude-requester",
        "--quorum-when",
        "amount > 10000",
    )
    policy = ScopePolicy.objects.get(name="ledger:write")
    assert (policy.quorum, policy.approver_group_id, policy.exclude_requester, policy.quorum_when) == (
        2,
        people.group.pk,
        True,
        "amount > 10000",
    )
    call_command(
        "scope_set",
        "ledger:write",
        "--audience",
        "http://ledger.test",
        "--sensitivity",
        "step_up",
        "--quorum",
        "1",
        "--approver-group",
        "",
        "--no-exclude-requester",
        "--quorum-when",
        "",
    )
    policy.refresh_from_db()
    assert not policy.has_quorum


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quorum", "2", "--approver-group", "nobody"], "no group named"),
        (["--quorum", "0", "--approver-group", "finance"], "quorum"),
        (["--quorum", "2"], "approver_group"),
        (["--exclude-requester"], "approver_group"),
        (["--quorum", "2", "--approver-group", "finance", "--quorum-when", "amount is big"], "quorum_when"),
    ],
)
def test_scope_set_refuses_a_quorum_that_cannot_work(
    people: Officials, flags: list[str], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        call_command(
            "scope_set",
            "ledger:write",
            "--audience",
            "http://ledger.test",
            "--sensitivity",
            "step_up",
            *flags,
        )
    assert not ScopePolicy.objects.get(name="ledger:write").has_quorum


def test_only_step_up_scopes_take_a_quorum(people: Officials) -> None:
    with pytest.raises(CommandError, match="step-up"):
        call_command(
            "scope_set",
            "catalog:read",
            "--audience",
            "http://catalog.test",
            "--sensitivity",
            "standard",
            "--quorum",
            "2",
            "--approver-group",
            "finance",
        )


def test_seed_demo_asks_a_second_signature_above_10000_only(db: None) -> None:
    call_command("seed_demo", "--json", stdout=io.StringIO())
    policy = ScopePolicy.objects.get(name="ledger:write")
    assert policy.approver_group is not None
    assert (policy.quorum, policy.approver_group.name, policy.exclude_requester, policy.quorum_when) == (
        2,
        "finance",
        False,
        "amount > 10000",
    )
    assert list(policy.approver_group.user_set.values_list("username", flat=True)) == ["comptroller"]
    from approvals.quorum import quorum_for

    assert quorum_for(scope="ledger:write", details=[ledger_entry("4250.00")]) is None  # the README's entry
    assert quorum_for(scope="ledger:write", details=[ledger_entry("25000.00")]) is not None


def test_the_admin_shows_the_quorum_fields(admin_client: Client, people: Officials) -> None:
    page = admin_client.get(
        f"/admin/consent/scopepolicy/{ScopePolicy.objects.get(name='ledger:write').pk}/change/"
    )
    text = page.content.decode()
    assert "Two-person approval" in text
    for field in ("quorum", "approver_group", "exclude_requester", "quorum_when"):
        assert f'name="{field}"' in text


def test_the_receipt_and_the_timeline_name_every_approver(
    grant: SessionGrant, scenario: Scenario, people: Officials
) -> None:
    import jwt

    from approvals.receipts import receipt_for_download
    from approvals.redemption import action_token_redeem
    from approvals.story import grant_story
    from tests.approvals.support import ledger_rs

    approval, _ = request_approval(grant, [ledger_entry(BIG)])
    _vote(approval, people.alice, "approve")
    _vote(approval, people.bob, "approve")
    token = approval_collect(auth_req_id=auth_req_id(approval), agent=scenario.agent)["access_token"]
    action_token_redeem(claims=verify(token, typ=ACTION_TOKEN_TYP), resource_server=ledger_rs(scenario))
    downloaded = receipt_for_download(approval_id=approval.pk, user_id=scenario.user.pk)
    assert downloaded is not None
    _, receipt = downloaded
    claims = jwt.decode(receipt, options={"verify_signature": False})
    assert [a["sub"] for a in claims["approvers"]] == [f"user:{people.alice.pk}", f"user:{people.bob.pk}"]
    assert claims["approver"]["sub"] == f"user:{people.bob.pk}"  # the one whose approval met the quorum
    story = grant_story(grant_id=grant.pk, user_id=scenario.user.pk)
    assert story is not None
    sentences = [e.sentence for e in story.entries]
    assert any("approved by alice and bob, each signed in on their own" in s for s in sentences), sentences
    assert any(s.startswith("Alice approved") for s in sentences), sentences
    assert any("approved by alice and bob." in s for s in sentences), sentences  # the redemption


def test_the_admin_shows_each_vote_on_a_request(
    admin_client: Client, grant: SessionGrant, people: Officials
) -> None:
    approval, _ = request_approval(grant, [ledger_entry(BIG)])
    _vote(approval, people.alice, "approve")
    page = admin_client.get(f"/admin/approvals/approvalrequest/{approval.pk}/change/").content.decode()
    assert "alice" in page and "Approved" in page

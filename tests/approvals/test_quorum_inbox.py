"""Two-person approval through the inbox: what each official sees, their own step-up, and refusals
(the right status, one audit row with the reason, nothing changed)."""

import pytest
from django.test import Client

from approvals.models import ApprovalRequest, ApprovalVote
from audit.models import AuditEvent
from consent.models import ScopePolicy
from tests.approvals.quorum_support import Officials, officials, require_quorum
from tests.approvals.support import install_outbox, ledger_entry, request_approval, session_grant
from tests.conftest import PASSWORD, Scenario

pytestmark = pytest.mark.django_db

S = ApprovalRequest.Status


@pytest.fixture
def people(scenario: Scenario, ledger_policy: ScopePolicy, monkeypatch: pytest.MonkeyPatch) -> Officials:
    install_outbox(monkeypatch)
    found = officials()
    require_quorum(found.group)
    return found


@pytest.fixture
def approval(scenario: Scenario, people: Officials) -> ApprovalRequest:
    return request_approval(session_grant(scenario), [ledger_entry("25000.00")])[0]


def signed_in(username: str) -> Client:
    client = Client()
    assert client.login(username=username, password=PASSWORD)
    return client


def refusals(approval: ApprovalRequest, reason: str) -> int:
    return AuditEvent.objects.filter(
        event="approval.vote_refused",
        outcome="refused",
        detail__approval_id=str(approval.pk),
        detail__reason=reason,
    ).count()


def test_an_official_sees_who_asks_for_whom_and_what_is_missing(
    approval: ApprovalRequest, people: Officials
) -> None:
    alice = signed_in("alice")
    page = alice.get("/approvals/").content.decode()
    assert 'Procurement Agent</strong> for <strong class="requester">officer</strong>' in page
    assert "Needs 2 approvals" in page and "Waiting for 2 more approvals" in page
    response = alice.post(f"/approvals/{approval.pk}/approve/", follow=True)
    page = response.content.decode()
    assert "Your approval is recorded. Waiting for 1 more approval" in page
    assert "You approved. Waiting for 1 more approval" in page
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING
    bob = signed_in("bob")
    bob.post(f"/approvals/{approval.pk}/approve/")
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.APPROVED


def test_the_excluded_requester_sees_it_wait_without_buttons(
    approval: ApprovalRequest, scenario: Scenario
) -> None:
    page = signed_in("officer").get("/approvals/").content.decode()
    assert "Waiting for 2 more approvals" in page
    card = page[page.index(f'data-id="{approval.pk}"') :]
    assert '<div class="actions" hidden>' in card[: card.index("</li>")]


@pytest.mark.parametrize(
    "who, status, reason",
    [
        ("officer", 403, "requester_excluded"),
    ],
)
def test_a_refused_vote_changes_nothing_and_is_audited_once(
    approval: ApprovalRequest, who: str, status: int, reason: str
) -> None:
    response = signed_in(who).post(f"/approvals/{approval.pk}/approve/")
    assert response.status_code == status
    assert refusals(approval, reason) == 1
    assert not ApprovalVote.objects.exists()
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING


def test_a_second_vote_by_the_same_official_is_refused(approval: ApprovalRequest) -> None:
    alice = signed_in("alice")
    alice.post(f"/approvals/{approval.pk}/approve/")
    response = alice.post(f"/approvals/{approval.pk}/deny/")
    assert response.status_code == 409
    assert refusals(approval, "already_voted") == 1
    assert list(ApprovalVote.objects.values_list("decision", flat=True)) == ["approve"]
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING


def test_an_official_removed_from_the_group_while_it_waits_is_refused(
    approval: ApprovalRequest, people: Officials
) -> None:
    alice = signed_in("alice")
    alice.post(f"/approvals/{approval.pk}/approve/")
    people.alice.groups.remove(people.group)
    response = alice.post(f"/approvals/{approval.pk}/approve/")  # she voted: she still sees it, and is told
    assert response.status_code == 403
    assert refusals(approval, "not_an_approver") == 1
    assert ApprovalVote.objects.count() == 1


def test_someone_outside_the_group_gets_404(approval: ApprovalRequest) -> None:
    response = signed_in("carol").post(f"/approvals/{approval.pk}/approve/")
    assert response.status_code == 404
    assert not ApprovalVote.objects.exists()


def test_each_vote_needs_the_voters_own_fresh_authentication(
    approval: ApprovalRequest, people: Officials
) -> None:
    from consent.models import ScopePolicy

    ScopePolicy.objects.filter(name="ledger:write").update(fresh_auth_seconds=60)
    alice = signed_in("alice")
    response = alice.post(f"/approvals/{approval.pk}/approve/")
    assert response.status_code == 302 and response["Location"] == f"/approvals/{approval.pk}/confirm/"
    assert not ApprovalVote.objects.exists()
    response = alice.post(f"/approvals/{approval.pk}/confirm/", {"secret": PASSWORD})
    assert response.status_code == 302
    vote = ApprovalVote.objects.get(user=people.alice)
    assert vote.auth["amr"] and vote.auth["auth_time"]
    # bob's session carries no fresh sign-in of its own: alice's does not count for him
    response = signed_in("bob").post(f"/approvals/{approval.pk}/approve/")
    assert response["Location"] == f"/approvals/{approval.pk}/confirm/"
    assert ApprovalRequest.objects.get(pk=approval.pk).status == S.PENDING


def test_the_officers_history_says_who_approved(approval: ApprovalRequest, scenario: Scenario) -> None:
    signed_in("alice").post(f"/approvals/{approval.pk}/approve/")
    signed_in("bob").post(f"/approvals/{approval.pk}/approve/")
    page = signed_in("officer").get("/approvals/").content.decode()
    assert "By alice and bob, each in the browser, each signed in on their own" in page

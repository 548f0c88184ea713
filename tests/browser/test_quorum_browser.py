"""Two-person approval in two real browsers, against the live stack (servers, Celery, Redis).

Two officials of the ``finance`` group each have the inbox open in their own browser context. The
procurement agent asks to write 25,000 USD to the ledger for the officer; the policy asks two
approvals from finance above 10,000, not the officer's own. The prompt reaches both inboxes live;
one approval leaves the agent polling ``authorization_pending``; the second mints the action token,
which lists both approvers. A denial by either ends a request at once.
"""

import re
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from approvals.models import ApprovalRequest, ApprovalVote
from consent.models import ScopePolicy
from consent.tokens import ACTION_TOKEN_TYP, verify
from tests.approvals.quorum_support import Officials, officials, require_quorum
from tests.approvals.support import ledger_entry
from tests.browser.conftest import watch_page
from tests.browser.test_inbox_browser import AgentClient
from tests.conftest import PASSWORD, OAuthFlow, Scenario
from tests.live import LiveStack

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ENTRY = ledger_entry("25000.00")
HEADLINE = "Append 25000.00 USD to Acme Office Supply (PO-2026-0142) — Financial ledger"
SCREENSHOT = "/tmp/quorum-inbox.png"
LIVE_STATUS = "Live: new requests appear here as they come in."


@pytest.fixture
def people(live: LiveStack, flow: OAuthFlow, ledger_policy: ScopePolicy) -> Officials:
    found = officials()
    require_quorum(found.group)
    return found


@pytest.fixture
def agent(live: LiveStack, scenario: Scenario, flow: OAuthFlow, people: Officials) -> Iterator[AgentClient]:
    token: str = flow.full()["access_token"]
    flow.client.logout()
    a = AgentClient(live, scenario, token)
    try:
        yield a
    finally:
        a.close()


def _inbox_of(
    live_context_factory: Callable[[], BrowserContext], live: LiveStack, username: str
) -> tuple[Page, list[str]]:
    page = live_context_factory().new_page()
    problems = watch_page(page)
    page.goto("/approvals/")
    page.wait_for_url(re.compile(r"/accounts/login/\?"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{live.url}/approvals/")
    expect(page.locator("#live-status")).to_have_text(LIVE_STATUS)  # websocket open
    return page, problems


@pytest.fixture
def contexts(chromium: Browser, live: LiveStack) -> Iterator[Callable[[], BrowserContext]]:
    opened: list[BrowserContext] = []

    def new() -> BrowserContext:
        context = chromium.new_context(base_url=live.url)
        context.set_default_timeout(15_000)
        opened.append(context)
        return context

    try:
        yield new
    finally:
        for context in opened:
            context.close()


def test_two_officials_approve_a_large_entry_and_the_token_lists_both(
    live: LiveStack,
    contexts: Callable[[], BrowserContext],
    scenario: Scenario,
    people: Officials,
    agent: AgentClient,
) -> None:
    alice, alice_problems = _inbox_of(contexts, live, "alice")
    bob, bob_problems = _inbox_of(contexts, live, "bob")
    asked = agent.ask(ENTRY)

    for page in (alice, bob):  # live, in each official's own inbox
        prompt = page.locator("#prompts li.prompt")
        expect(prompt.get_by_role("heading", name=HEADLINE)).to_be_visible()
        expect(prompt).to_contain_text("Procurement Agent for officer asks to use ledger:write")
        expect(prompt.locator(".quorum")).to_contain_text("Needs 2 approvals")
        expect(prompt.get_by_role("button", name="Approve")).to_be_visible()

    alice.get_by_role("button", name="Approve").click()
    alice.wait_for_url(f"{live.url}/approvals/")
    expect(alice.get_by_role("status").filter(has_text="Your approval is recorded")).to_contain_text(
        "Waiting for 1 more approval"
    )
    mine = alice.locator("#prompts li.prompt")
    expect(mine.locator(".quorum")).to_contain_text("You approved. Waiting for 1 more approval")
    expect(mine.get_by_role("button", name="Approve")).to_be_hidden()
    expect(bob.locator("#prompts li.prompt .quorum")).to_contain_text("Waiting for 1 more approval")  # live
    alice.screenshot(path=SCREENSHOT, full_page=True)

    pending = agent.poll(asked["auth_req_id"])
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending", pending.text
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.PENDING

    bob.get_by_role("button", name="Approve").click()
    bob.wait_for_url(f"{live.url}/approvals/")
    expect(bob.get_by_role("status").filter(has_text="Approved:")).to_contain_text(HEADLINE)
    for page in (alice, bob):
        expect(page.locator("#prompts li.prompt")).to_have_count(0)  # gone from both inboxes, live

    collected = agent.poll(asked["auth_req_id"])
    assert collected.status_code == 200, collected.text
    claims = verify(collected.json()["access_token"], typ=ACTION_TOKEN_TYP)
    assert claims["sub"] == f"user:{scenario.user.pk}"
    assert [a["sub"] for a in claims["approvers"]] == [f"user:{people.alice.pk}", f"user:{people.bob.pk}"]
    assert all(a["amr"] and a["time"] for a in claims["approvers"])
    assert alice_problems == [] and bob_problems == [], (alice_problems, bob_problems)


def test_one_officials_denial_ends_the_request(
    live: LiveStack,
    contexts: Callable[[], BrowserContext],
    scenario: Scenario,
    people: Officials,
    agent: AgentClient,
) -> None:
    alice, problems = _inbox_of(contexts, live, "alice")
    asked = agent.ask(ENTRY)
    prompt = alice.locator("#prompts li.prompt")
    expect(prompt.get_by_role("heading", name=HEADLINE)).to_be_visible()
    alice.get_by_role("button", name="Deny").click()
    alice.wait_for_url(f"{live.url}/approvals/")
    expect(alice.locator("#prompts li.prompt")).to_have_count(0)
    denied = agent.poll(asked["auth_req_id"])
    assert denied.status_code == 400 and denied.json()["error"] == "access_denied", denied.text
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.DENIED
    assert list(ApprovalVote.objects.values_list("user_id", "decision")) == [(people.alice.pk, "deny")]
    assert problems == [], problems

"""The live approvals inbox in a real Chromium, against the real stack (config.serving + Celery + Redis).

The officer signs in through the login form; the agent is a real HTTP client asking for a
step-up action over CIBA; the prompt arrives over the websocket without a reload; the officer
clicks Approve or Deny; the agent collects its result at the token endpoint; the ledger (a
resource server) redeems the action token exactly once.
"""

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from approvals.models import ActionToken, ApprovalRequest
from approvals.rar import action_hash
from consent.models import ScopePolicy
from tests.approvals.conftest import LEDGER_ENTRY
from tests.browser.conftest import watch_page
from tests.conftest import PASSWORD, OAuthFlow, Scenario
from tests.live import LiveStack

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOT = "/tmp/inbox.png"
SCREENSHOT_PHONE = "/tmp/inbox-phone.png"
CIBA = "urn:openid:params:grant-type:ciba"
NOTE = "<img src=x onerror=alert(1)>step 5"
HEADLINE = "Append 4250.00 USD to Acme Office Supply (PO-2026-0142) — Financial ledger"
LIVE_STATUS = "Live: new requests appear here as they come in."


def _http() -> httpx.Client:
    # trust_env=False: the live server is on loopback; no proxy from the environment may interfere.
    return httpx.Client(trust_env=False, timeout=10)


class AgentClient:
    """The agent's side over real HTTP: ask (CIBA backchannel request), then poll the token endpoint."""

    def __init__(self, live: LiveStack, scenario: Scenario, session_token: str) -> None:
        self.url, self.s, self.session_token = live.url, scenario, session_token
        self.http = _http()
        self.auth = (scenario.agent.client_id, scenario.agent_secret)

    def ask(self, details: dict[str, Any] | None = None, **extra: str) -> dict[str, Any]:
        response = self.http.post(
            f"{self.url}/o/bc-authorize/",
            auth=self.auth,
            data={
                "scope": "ledger:write",
                "login_hint_token": self.session_token,
                "authorization_details": json.dumps([details or LEDGER_ENTRY]),
                **extra,
            },
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert set(body) >= {"auth_req_id", "expires_in", "interval"}
        return body

    def poll(self, auth_req_id: str) -> httpx.Response:
        return self.http.post(
            f"{self.url}/o/token/", auth=self.auth, data={"grant_type": CIBA, "auth_req_id": auth_req_id}
        )

    def redeem(self, token: str, **extra: str) -> httpx.Response:
        return self.http.post(
            f"{self.url}/o/redeem/",
            auth=(self.s.ledger_client_id, self.s.ledger_secret),
            data={"token": token, **extra},
        )

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def session_token(live: LiveStack, flow: OAuthFlow, ledger_policy: ScopePolicy) -> str:  # noqa: F811
    """The agent's session access token, issued under the live issuer (``live`` comes first)."""
    token: str = flow.full()["access_token"]
    flow.client.logout()
    return token


@pytest.fixture
def agent(live: LiveStack, scenario: Scenario, session_token: str) -> Iterator[AgentClient]:
    a = AgentClient(live, scenario, session_token)
    try:
        yield a
    finally:
        a.close()


def _sign_in(page: Page, live: LiveStack) -> None:
    """Open the inbox signed out, get sent to the login form, sign in, land on the inbox."""
    page.goto("/approvals/")
    page.wait_for_url(re.compile(r"/accounts/login/\?"))
    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{live.url}/approvals/")
    cookies = {c["name"]: c for c in page.context.cookies(live.url)}
    assert "sessionid" in cookies, "no session cookie for the live server's origin"
    assert cookies["sessionid"]["domain"] == "127.0.0.1" and cookies["sessionid"]["httpOnly"]


def _open_inbox(page: Page) -> None:
    """The inbox, empty, with its websocket connected; marks the document to detect reloads."""
    if not page.url.endswith("/approvals/"):
        page.goto("/approvals/")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#empty")).to_contain_text("Nothing waiting")
    expect(page.locator("#pending-badge")).to_have_text("0")
    expect(page.locator("#live-status")).to_have_text(LIVE_STATUS)  # websocket open
    page.evaluate("window.__sameDocument = true")


def _still_same_document(page: Page) -> bool:
    same: bool = page.evaluate("window.__sameDocument === true")
    return same


def _prompt_arrives(page: Page) -> None:
    headline = page.get_by_role("heading", name=HEADLINE)
    expect(headline).to_be_visible()
    assert _still_same_document(page), "the prompt appeared only after a reload"
    prompt = page.locator("#prompts li.prompt")
    expect(prompt).to_have_count(1)
    expect(page.locator("#empty")).to_be_hidden()


def _verify_action_token(token: str, live: LiveStack, scenario: Scenario) -> dict[str, Any]:
    with _http() as http:
        metadata = http.get(f"{live.url}/.well-known/oauth-authorization-server").json()
        jwks = http.get(metadata["jwks_uri"]).json()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "action+jwt"
    key = jwt.PyJWK({k["kid"]: k for k in jwks["keys"]}[header["kid"]])
    claims = jwt.decode(
        token, key, algorithms=[header["alg"]], issuer=live.url, audience="http://ledger.test"
    )
    assert claims["scope"] == "ledger:write"
    assert claims["sub"] == f"user:{scenario.user.pk}"
    assert claims["act"] == {"sub": f"agent:{scenario.agent.client_id}"}
    assert claims["authorization_details"] == [LEDGER_ENTRY]
    assert claims["action_hash"] == action_hash([LEDGER_ENTRY])
    return claims


def test_prompt_arrives_live_and_approve_mints_a_one_shot_token(
    live: LiveStack, live_context: BrowserContext, scenario: Scenario, agent: AgentClient
) -> None:
    page = live_context.new_page()
    problems = watch_page(page)
    _sign_in(page, live)
    _open_inbox(page)

    asked = agent.ask(binding_message=NOTE)
    _prompt_arrives(page)
    prompt = page.locator("#prompts li.prompt")
    expect(prompt).to_contain_text("Procurement Agent")
    expect(prompt.locator("code").first).to_have_text("ledger:write")

    # The agent's note: shown, labelled, as literal text. No element was created from it.
    note = prompt.locator(".agent-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Note from the agent (its own words):")
    expect(note.locator("q")).to_have_text(NOTE)
    expect(page.locator("img")).to_have_count(0)
    assert page.evaluate("document.querySelectorAll('#prompts q *').length") == 0

    # Header badge, tab title and a ticking countdown with the absolute time on hover.
    expect(page.locator("#pending-badge")).to_have_text("1")
    expect(page.locator("#pending-badge")).to_have_attribute("aria-label", "1 waiting")
    expect(page).to_have_title("(1) Approvals · Countersign")
    countdown = prompt.locator("time.countdown")
    expect(countdown).to_have_text(re.compile(r"^(9|10):\d\d$"))  # a 600 s window, just opened
    expect(countdown).to_have_attribute("title", re.compile(r"\d"))
    first = countdown.text_content()
    assert first is not None
    expect(countdown).not_to_have_text(first, timeout=3000)  # it ticks
    expect(prompt.get_by_role("button", name="Approve")).to_be_visible()
    expect(prompt.get_by_role("button", name="Deny")).to_be_visible()
    page.screenshot(path=SCREENSHOT, full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.screenshot(path=SCREENSHOT_PHONE, full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, (
        "the inbox scrolls sideways on a phone"
    )
    page.set_viewport_size({"width": 1280, "height": 720})

    # Before a decision the agent is told to wait.
    pending = agent.poll(asked["auth_req_id"])
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending", pending.text

    page.get_by_role("button", name="Approve").click()
    page.wait_for_url(f"{live.url}/approvals/")
    expect(page.get_by_role("status").filter(has_text="Approved:")).to_contain_text(HEADLINE)
    expect(page.locator("#prompts li.prompt")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#pending-badge")).to_have_text("0")

    # A decided request answers the very next poll (slow_down only limits pending polls).
    collected = agent.poll(asked["auth_req_id"])
    assert collected.status_code == 200, collected.text
    body = collected.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "ledger:write"
    claims = _verify_action_token(body["access_token"], live, scenario)
    approval = ApprovalRequest.objects.get()
    assert claims["approval_id"] == str(approval.pk)
    assert approval.status == ApprovalRequest.Status.ISSUED
    assert approval.decided_by_id == scenario.user.pk and approval.decision_method == "browser"
    assert approval.binding_message == NOTE

    # The ledger redeems once, with the hash it recomputed from the request it will execute.
    redeemed = agent.redeem(body["access_token"], action_hash=action_hash([LEDGER_ENTRY]))
    assert redeemed.status_code == 200, redeemed.text
    assert redeemed.json()["redeemed"] is True and redeemed.json()["approval_id"] == str(approval.pk)
    again = agent.redeem(body["access_token"], action_hash=action_hash([LEDGER_ENTRY]))
    assert again.status_code == 400, again.text
    assert again.json()["error"] == "invalid_token"
    assert "already redeemed" in again.json()["error_description"]
    token = ActionToken.objects.get()
    assert token.redeemed_at is not None and token.jti == claims["jti"]
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.REDEEMED

    # The collected token cannot be collected twice.
    twice = agent.poll(asked["auth_req_id"])
    assert twice.status_code == 400 and twice.json()["error"] == "invalid_grant", twice.text
    assert problems == [], problems


def test_deny_in_the_inbox_gives_the_agent_access_denied(
    live: LiveStack, live_context: BrowserContext, scenario: Scenario, agent: AgentClient
) -> None:
    page = live_context.new_page()
    problems = watch_page(page)
    _sign_in(page, live)
    _open_inbox(page)

    asked = agent.ask(binding_message=NOTE)
    _prompt_arrives(page)
    expect(page.locator("#pending-badge")).to_have_text("1")

    page.get_by_role("button", name="Deny").click()
    page.wait_for_url(f"{live.url}/approvals/")
    expect(page.get_by_role("status").filter(has_text="Denied:")).to_contain_text(HEADLINE)
    expect(page.locator("#prompts li.prompt")).to_have_count(0)
    expect(page.locator("#pending-badge")).to_have_text("0")

    denied = agent.poll(asked["auth_req_id"])
    assert denied.status_code == 400, denied.text
    assert denied.json()["error"] == "access_denied"
    approval = ApprovalRequest.objects.get()
    assert approval.status == ApprovalRequest.Status.DENIED
    assert not ActionToken.objects.exists()
    assert problems == [], problems


def test_approving_in_one_tab_removes_the_prompt_from_the_other(
    live: LiveStack, live_context: BrowserContext, scenario: Scenario, agent: AgentClient
) -> None:
    first = live_context.new_page()
    problems = watch_page(first)
    _sign_in(first, live)
    second = live_context.new_page()  # same context: same session cookie
    problems += watch_page(second)
    _open_inbox(first)
    _open_inbox(second)

    asked = agent.ask(binding_message=NOTE)
    _prompt_arrives(first)
    _prompt_arrives(second)
    expect(second.locator("#pending-badge")).to_have_text("1")

    first.get_by_role("button", name="Approve").click()
    first.wait_for_url(f"{live.url}/approvals/")
    expect(first.get_by_role("status").filter(has_text="Approved:")).to_be_visible()

    # The other tab learns of it over its websocket: no reload, no click.
    expect(second.locator("#prompts li.prompt")).to_have_count(0)
    assert _still_same_document(second), "the second tab was reloaded"
    expect(second.locator("#empty")).to_be_visible()
    expect(second.locator("#pending-badge")).to_have_text("0")
    expect(second.locator("#live-status")).to_have_text("A request was closed: Approved.")
    expect(second).to_have_title("Approvals · Countersign")

    collected = agent.poll(asked["auth_req_id"])
    assert collected.status_code == 200, collected.text
    assert jwt.get_unverified_header(collected.json()["access_token"])["typ"] == "action+jwt"
    assert problems == [], problems

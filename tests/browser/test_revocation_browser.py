"""Revoking an agent on /grants/ clears its prompts from every open inbox tab, live.

Against the real stack (granian + uvicorn/Channels over Redis + a Celery worker) in Debian's Chromium:
the officer keeps /approvals/ open in one tab; the agent asks over HTTP and the prompt appears
without a reload; in a second tab the officer revokes the agent on Connected agents; the first
tab's prompt goes away on its own, the badge drops to 0, the agent's next poll is refused and
the resource server's introspection reports the session token inactive.
"""

import json
import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.models import ScopePolicy, SessionGrant
from tests.approvals.conftest import LEDGER_ENTRY
from tests.browser.conftest import watch_page
from tests.conftest import PASSWORD, OAuthFlow, Scenario
from tests.live import LiveStack

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CIBA = "urn:openid:params:grant-type:ciba"
HEADLINE = "Append 4250.00 USD to Acme Office Supply (PO-2026-0142) — Financial ledger"
LIVE_STATUS = "Live: new requests appear here as they come in."


def _http() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10)  # loopback: no proxy from the environment


@pytest.fixture
def session_tokens(live: LiveStack, flow: OAuthFlow, ledger_policy: ScopePolicy) -> dict[str, Any]:  # noqa: F811
    """The agent's token response, issued under the live server's issuer (``live`` first)."""
    tokens: dict[str, Any] = flow.full()
    flow.client.logout()
    return tokens


def _sign_in(page: Page, live: LiveStack) -> None:
    page.goto("/approvals/")
    page.wait_for_url(re.compile(r"/accounts/login/\?"))
    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{live.url}/approvals/")


def test_revoking_on_grants_page_clears_the_prompt_in_the_open_inbox(
    live: LiveStack, live_context: BrowserContext, scenario: Scenario, session_tokens: dict[str, Any]
) -> None:
    http = _http()
    agent_auth = (scenario.agent.client_id, scenario.agent_secret)
    try:
        inbox = live_context.new_page()
        problems = watch_page(inbox)
        _sign_in(inbox, live)
        expect(inbox.locator("#empty")).to_be_visible()
        expect(inbox.locator("#pending-badge")).to_have_text("0")
        expect(inbox.locator("#live-status")).to_have_text(LIVE_STATUS)  # websocket open
        inbox.evaluate("window.__sameDocument = true")

        # The agent asks over HTTP; the prompt arrives in the open tab without a reload.
        asked = http.post(
            f"{live.url}/o/bc-authorize/",
            auth=agent_auth,
            data={
                "scope": "ledger:write",
                "login_hint_token": session_tokens["access_token"],
                "authorization_details": json.dumps([LEDGER_ENTRY]),
            },
        )
        assert asked.status_code == 200, asked.text
        auth_req_id = asked.json()["auth_req_id"]
        expect(inbox.get_by_role("heading", name=HEADLINE)).to_be_visible()
        expect(inbox.locator("#prompts li.prompt")).to_have_count(1)
        expect(inbox.locator("#pending-badge")).to_have_text("1")
        assert inbox.evaluate("window.__sameDocument === true"), "the prompt appeared only after a reload"

        # Second tab (same session): Connected agents, Revoke this agent.
        grants = live_context.new_page()
        problems += watch_page(grants)
        grants.goto("/grants/")
        revoke = grants.get_by_role("button", name=f"Revoke {scenario.agent.name}", exact=True)
        expect(revoke).to_be_visible()
        revoke.click()
        grants.wait_for_url(f"{live.url}/grants/")
        expect(grants.get_by_text("Access revoked. The agent's tokens stopped working.")).to_be_visible()
        expect(grants.get_by_role("button", name=f"Revoke {scenario.agent.name}", exact=True)).to_have_count(
            0
        )

        # The first tab learns of it over its websocket: no reload, no click.
        expect(inbox.locator("#prompts li.prompt")).to_have_count(0)
        expect(inbox.get_by_role("heading", name=HEADLINE)).to_have_count(0)
        expect(inbox.locator("#pending-badge")).to_have_text("0")
        expect(inbox.locator("#empty")).to_be_visible()
        assert inbox.evaluate("window.__sameDocument === true"), "the inbox tab was reloaded"

        grant = SessionGrant.objects.get()
        assert grant.status == SessionGrant.Status.REVOKED and grant.end_reason == "revoked_by_user"
        assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.CANCELLED

        # The agent's next poll: access denied.
        polled = http.post(
            f"{live.url}/o/token/", auth=agent_auth, data={"grant_type": CIBA, "auth_req_id": auth_req_id}
        )
        assert polled.status_code == 400 and polled.json()["error"] == "access_denied", polled.text

        # The resource server's introspection: inactive, nothing more.
        introspected = http.post(
            f"{live.url}/o/introspect/",
            auth=(scenario.rs_client_id, scenario.rs_secret),
            data={"token": session_tokens["access_token"]},
        )
        assert introspected.status_code == 200 and introspected.json() == {"active": False}, introspected.text

        assert (
            AuditEvent.objects.filter(
                event="grant.revoked", grant_id=str(grant.pk), actor=f"user:{scenario.user.pk}"
            ).count()
            == 1
        )
        assert problems == [], problems
    finally:
        http.close()

"""A budget in a real Chromium: the officer sets one on the consent screen, the agent's small
purchase is approved without a prompt, and Connected agents shows what is left.

The agent and the resource server talk to the live server over real HTTP.
"""

import json
import re
from decimal import Decimal
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest
from playwright.sync_api import Page, expect

from approvals.models import ApprovalRequest
from consent.budget import Budget
from consent.services import scope_set
from tests.browser.conftest import BrowserScenario
from tests.conftest import PASSWORD, pkce_pair

pytestmark = [pytest.mark.browser]


def test_a_small_purchase_within_the_budget_set_at_consent_goes_through_without_a_prompt(
    page: Page, page_problems: list[str], browser_scenario: BrowserScenario
) -> None:
    s = browser_scenario
    scope_set(
        name="ledger:write",
        values={
            "description": "Financial ledger",
            "authorization_details_types": ["ledger_entry"],
            "budget_currency": "USD",
            "budget_max_per_action": Decimal("1000.00"),
            "budget_max_total": Decimal("5000.00"),
            "budget_periods": ["week", "month"],
        },
    )
    verifier, challenge = pkce_pair()
    page.goto(
        "/o/authorize/?"
        + urlencode(
            {
                "response_type": "code",
                "client_id": s.agent.client_id,
                "redirect_uri": s.redirect_uri,
                "scope": "catalog:read budget:read ledger:write",
                "state": "st-budget",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
    )
    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/o/authorize/\?"))

    # The optional budget, within what the administrator allows.
    budget = page.get_by_role("group", name=re.compile("a budget for “Financial ledger”"))
    expect(budget).to_contain_text("at most 1,000.00 USD each and 5,000.00 USD per period")
    budget.get_by_label("Up to (USD) each").fill("500.00")
    budget.get_by_label("In total (USD)").fill("2000.00")
    budget.get_by_label("per").select_option("week")
    assert page_problems == []  # later pages open the live inbox's websocket, which live_server lacks
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(re.compile(re.escape(s.redirect_uri) + r"\?"))
    code = parse_qs(urlparse(page.url).query)["code"][0]

    with httpx.Client(trust_env=False, timeout=10, base_url=s.base_url) as http:
        agent = (s.agent.client_id, s.agent_secret)
        token = http.post(
            "/o/token/",
            auth=agent,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": s.redirect_uri,
                "code_verifier": verifier,
            },
        ).json()["access_token"]
        entry = {
            "type": "ledger_entry",
            "actions": ["append"],
            "purchase_order": "PO-2026-0150",
            "vendor": "Acme Office Supply",
            "amount": "120.00",
            "currency": "USD",
        }
        asked = http.post(
            "/o/bc-authorize/",
            auth=agent,
            data={
                "scope": "ledger:write",
                "login_hint_token": token,
                "authorization_details": json.dumps([entry]),
            },
        )
        assert asked.status_code == 200, asked.text
        # No prompt: the first poll already has the action token.
        collected = http.post(
            "/o/token/",
            auth=agent,
            data={
                "grant_type": "urn:openid:params:grant-type:ciba",
                "auth_req_id": asked.json()["auth_req_id"],
            },
        )
        assert collected.status_code == 200, collected.text
        assert collected.json()["authorization_details"] == [entry]

    approval = ApprovalRequest.objects.get()
    assert approval.status == ApprovalRequest.Status.ISSUED and approval.decision_method == "budget"
    assert Budget.objects.get().used == Decimal("120.00")

    page.goto("/approvals/")
    expect(page.locator("#empty")).to_be_visible()  # nothing waits for the officer
    page.goto("/grants/")
    expect(page.locator(".budget-left")).to_have_text(
        "1,880.00 USD left of 2,000.00 USD this week; up to 500.00 USD each"
    )
    page.get_by_role("link", name="See everything it did").click()
    expect(page.locator("#timeline-card")).to_contain_text("approved within your budget")

    # Ending it takes effect at once.
    page.goto("/grants/")
    page.get_by_role("button", name="End budget").click()
    expect(page.locator(".budget-left")).to_have_count(0)
    assert Budget.objects.get().status == Budget.Status.ENDED

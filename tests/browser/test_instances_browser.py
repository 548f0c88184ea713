"""Cutting off one instance of an agent on /grants/<id>/, in a real Chromium.

Two instances of the procurement agent join the officer's connection over real HTTP, each proving
its own key with an attestation the agent's registered key signed. The officer opens the
connection's page, sees both instances, presses **Cut off** on one; that instance's next token
request is refused (``instance_cut_off``) while the other's still succeeds and the connection stays.
"""

import re
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest
from playwright.sync_api import Page, expect

from audit.models import AuditEvent
from consent.models import AgentInstance, SessionGrant
from countersign.instance import ATTESTATION_HEADER, POP_HEADER
from countersign.instance import AgentInstance as SdkInstance
from tests.browser.conftest import BrowserScenario
from tests.conftest import PASSWORD, basic, pkce_pair
from tests.consent.test_token_exchange import ACCESS, EXCHANGE, AgentKey

pytestmark = [pytest.mark.browser]

STATE = "st-instances"


def _consent_and_code(page: Page, s: BrowserScenario) -> tuple[str, str]:
    verifier, challenge = pkce_pair()
    page.goto(
        "/o/authorize/?"
        + urlencode(
            {
                "response_type": "code",
                "client_id": s.agent.client_id,
                "redirect_uri": s.redirect_uri,
                "scope": "catalog:read budget:read",
                "state": STATE,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
    )
    page.wait_for_url(re.compile(r"/accounts/login/\?"))
    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/o/authorize/\?"))
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(re.compile(re.escape(s.redirect_uri) + r"\?"))
    return parse_qs(urlparse(page.url).query)["code"][0], verifier


def _join(http: httpx.Client, s: BrowserScenario, instance: SdkInstance, subject: str) -> httpx.Response:
    return http.post(
        f"{s.base_url}/o/token/",
        data={"grant_type": EXCHANGE, "subject_token": subject, "subject_token_type": ACCESS},
        headers={ATTESTATION_HEADER: instance.attestation(), POP_HEADER: instance.pop(s.base_url)},
    )


def test_the_person_cuts_off_one_instance_and_its_next_call_is_refused(
    page: Page, page_problems: list[str], browser_scenario: BrowserScenario
) -> None:
    s = browser_scenario
    key = AgentKey()
    s.agent.jwks = {"keys": [key.jwk]}
    s.agent.save()
    first, second = (
        SdkInstance.generate(s.agent.client_id, agent_key=key.private, key_id=key.kid, instance=name)
        for name in ("3f9c2a7b", "b81d04e6")
    )
    http = httpx.Client(trust_env=False, timeout=10)

    code, verifier = _consent_and_code(page, s)
    agents = http.post(
        f"{s.base_url}/o/token/",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": s.redirect_uri,
            "code_verifier": verifier,
        },
        headers={"Authorization": basic(s.agent.client_id, s.agent_secret)},
    )
    assert agents.status_code == 200, agents.text
    subject = agents.json()["access_token"]
    assert _join(http, s, first, subject).status_code == 200
    assert _join(http, s, second, subject).status_code == 200

    grant = SessionGrant.objects.get()
    page.goto(f"/grants/{grant.pk}/")
    expect(page.get_by_role("heading", name="Instances")).to_be_visible()
    rows = page.locator("ul.instances li")
    expect(rows).to_have_count(2)
    expect(page.locator("#instance-3f9c2a7b")).to_contain_text("Active")
    page.get_by_role("button", name="Cut off instance 3f9c…").click()
    page.wait_for_url(f"{s.base_url}/grants/{grant.pk}/")
    expect(page.get_by_text("Instance 3f9c… was cut off.")).to_be_visible()
    expect(page.locator("#instance-3f9c2a7b")).to_contain_text("Cut off")
    expect(page.get_by_role("button", name="Cut off instance 3f9c…")).to_have_count(0)
    expect(page.locator("#instance-b81d04e6")).to_contain_text("Active")
    expect(page.locator("#timeline-card")).to_contain_text("You cut off Procurement Agent (instance 3f9c…)")

    refused = _join(http, s, first, subject)
    assert refused.status_code == 401 and refused.json()["reason"] == "instance_cut_off"
    assert AuditEvent.objects.filter(event="agent_instance.refused").count() == 1
    assert _join(http, s, second, subject).status_code == 200
    assert AgentInstance.objects.get(instance_id="3f9c2a7b").cut_off_by == f"user:{s.user.pk}"
    assert SessionGrant.objects.get().status == "active"
    # live_server speaks no websockets and no one serves the agent's callback: only those may have failed.
    assert not [p for p in page_problems if p.startswith("page error")], page_problems

"""The procurement demo watched from the officer's side: /grants/<id>/ fills in live while the
agent works (each system reports the uses it accepted), and Revoke on that page ends the run: the
agent's next call is refused."""

import queue
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, expect

from consent.models import GrantUse, SessionGrant
from countersign import GrantRevoked
from examples.procurement import agent as procurement_agent
from tests.browser.conftest import chromium, live_context, watch_page  # noqa: F401  (fixtures)
from tests.examples.test_procurement_demo import (  # noqa: F401  (fixtures)
    Systems,
    _sign_in_and_allow,
    demo_config,
    systems,
)
from tests.live import LiveStack

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_grant_page_follows_the_run_live_and_revoke_stops_the_agent(
    live: LiveStack,
    live_context: BrowserContext,  # noqa: F811
    demo_config: tuple[dict[str, Any], Path],  # noqa: F811
    systems: Systems,  # noqa: F811
) -> None:
    config, _ = demo_config
    page = live_context.new_page()
    problems = watch_page(page)
    consent_urls: queue.Queue[str] = queue.Queue()
    outcome: dict[str, Any] = {}

    def agent_thread() -> None:
        try:
            outcome["result"] = procurement_agent.run(
                config,
                say=lambda line: None,
                on_consent_url=consent_urls.put,
                consent_timeout=90,
                approval_timeout=90,
            )
        except BaseException as exc:  # noqa: BLE001  (reported below)
            outcome["error"] = exc

    thread = threading.Thread(target=agent_thread, daemon=True)
    thread.start()
    _sign_in_and_allow(page, consent_urls.get(timeout=30), live)
    grant = SessionGrant.objects.get()

    # Open the story as soon as the connection exists; what the agent does next arrives by itself.
    page.goto(f"/grants/{grant.pk}/")
    page.evaluate("window.__same_document = 1")
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("You connected Procurement Agent")
    expect(page.locator("#timeline-status")).to_contain_text("Live")
    for system in ("Vendor catalog", "Budget", "Procurement drafting", "Approval routing"):
        expect(timeline).to_contain_text(
            re.compile(rf"{system} served Procurement Agent: (GET|POST) /"), timeout=20_000
        )
    expect(timeline).to_contain_text(
        "Procurement Agent asked for your approval: Append 4250.00 USD", timeout=20_000
    )
    assert page.evaluate("window.__same_document") == 1  # no reload: it came over the websocket
    assert GrantUse.objects.filter(grant=grant).count() >= 4

    # End the grant from this page while the agent waits for step 5.
    page.get_by_role("button", name="Revoke").click()
    expect(timeline).to_contain_text("The connection to Procurement Agent ended: you revoked it.")
    expect(page.get_by_role("button", name="Revoke")).to_have_count(0)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), GrantRevoked), outcome  # its next call was refused
    assert SessionGrant.objects.get().status == SessionGrant.Status.REVOKED

    # The person's pages fit a desktop and a phone without sideways scrolling.
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 844})
        for path in ("/activity/", "/grants/", f"/grants/{grant.pk}/", "/approvals/"):
            page.goto(path)
            assert page.evaluate("document.documentElement.scrollWidth") <= width, (path, width)
            name = path.strip("/").split("/")[0] + ("-detail" if path.count("/") > 2 else "")
            page.screenshot(path=f"/tmp/person-{name}-{width}.png", full_page=True)
    page.goto("/activity/")
    expect(page.locator('li[data-event="grant.revoked"]').first).to_contain_text(
        "The connection to Procurement Agent ended: you revoked it."
    )
    expect(page.locator("#f-agent")).to_be_visible()
    # A re-read of the list still in flight when Revoke navigated away is cancelled by the browser.
    problems = [p for p in problems if not (p.endswith("net::ERR_ABORTED") and "?part=timeline" in p)]
    assert problems == [], problems

"""The README walkthrough, followed literally: its shell blocks run, in order, in a real bash
against the live servers, with the browser steps done in Chromium. If the README drifts from what
the server does, this fails.

Two narrow substitutions, both what a reader does by hand: ``CS=http://127.0.0.1:8000`` names the
test's live server, and the ``CALLBACK='paste …'`` line gets the address the browser landed on.
"""

import json
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, expect

from tests.live import LiveStack
from tests.test_readme import DEMO_PASSWORD, Shell, _env, _reader_dir, shell_blocks

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_walkthrough_as_written(live: LiveStack, live_context: BrowserContext, tmp_path: Path) -> None:
    blocks = shell_blocks("Walkthrough: the reference scenario")
    assert len(blocks) == 8, "the walkthrough's steps changed: update this test with them"
    shell = Shell(_reader_dir(tmp_path), _env(live.env))
    setup, authorize, exchange, ask, poll, collect, redeem = (
        blocks[0],
        blocks[1],
        blocks[2],
        blocks[3],
        blocks[4],
        blocks[5],
        blocks[6],
    )

    assert "CS=http://127.0.0.1:8000\n" in setup
    metadata = json.loads(shell.run(setup.replace("CS=http://127.0.0.1:8000\n", f"CS={live.url}\n")))
    assert metadata["issuer"] == live.url

    url = shell.run(authorize).strip().splitlines()[-1]
    assert url.startswith(f"{live.url}/o/authorize/?")

    # The browser: open the URL, sign in as officer, Allow; the address bar ends at the callback.
    page = live_context.new_page()
    page.route(
        "http://127.0.0.1:8199/callback**",
        lambda route: route.fulfill(status=200, content_type="text/plain", body="nothing listens here"),
    )
    page.goto(url)
    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(DEMO_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Allowed for this session")).to_be_visible()
    expect(page.get_by_text("Will ask you each time")).to_be_visible()
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(re.compile(r"http://127\.0\.0\.1:8199/callback\?"))
    callback = page.url

    placeholder = "CALLBACK='paste the address from the browser here'"
    assert placeholder in exchange
    tokens = json.loads(shell.run(exchange.replace(placeholder, f"CALLBACK='{callback}'")))
    assert tokens["token_type"] == "Bearer" and tokens["refresh_token"]

    page.goto(f"{live.url}/approvals/")
    expect(page.locator("#live-status")).to_contain_text("Live")
    asked = json.loads(shell.run(ask))
    assert 590 <= asked["expires_in"] <= 600 and asked["interval"] == 5
    prompt = page.locator("#prompts li.prompt")
    expect(prompt).to_contain_text("Append 4250.00 USD to Acme Office Supply (PO-2026-0142)")
    expect(prompt).to_contain_text("one single-use token")
    expect(prompt).to_contain_text("120 seconds")

    assert json.loads(shell.run(poll))["error"] in ("authorization_pending", "slow_down")
    prompt.get_by_role("button", name="Approve").click()
    expect(page.get_by_role("status").filter(has_text="Approved:")).to_be_visible()
    row = page.locator("#history tr[data-id]").first
    expect(row.locator(".badge")).to_have_text("Approved")
    page.evaluate("window.__walkthrough = 1")
    time.sleep(asked["interval"] + 0.5)  # "wait the interval"
    issued = json.loads(shell.run(collect))
    assert issued["token_type"] == "Bearer" and issued["access_token"].count(".") == 2

    introspected, first, second = (json.loads(line) for line in shell.run(redeem).strip().splitlines())
    assert introspected["active"] is True and introspected["authorization_details"][0]["amount"] == "4250.00"
    assert first["authorization_details"][0]["purchase_order"] == "PO-2026-0142", first
    assert second["error"] == "invalid_token" and "already redeemed" in second["error_description"]
    receipt = json.loads(shell.run(blocks[7]))
    assert receipt["approval_id"] == first["approval_id"] and receipt["approver"]["amr"] == ["pwd"]

    # The inbox's history, still the same document (no reload), follows the redemption live.
    assert page.evaluate("window.__walkthrough") == 1
    expect(row.locator(".badge")).to_have_text("Redeemed")
    expect(row).to_contain_text("signed in with password")

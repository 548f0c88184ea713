"""The inbox page repairs its live stream from the database, in a real Chromium against the real
server (uvicorn + channels_redis): a flood past the channel layer's capacity, a gap, and a lost
newest message all end with every prompt on every open tab, without a reload.

The pushes here are sent by the real ``deliver_prompt`` task body, run in this process, so that
the test can give the sending side a tiny channel capacity and see channels_redis drop messages.
"""

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections
from playwright.sync_api import BrowserContext, Page, expect
from pytest_django import Settings

from approvals import tasks as approval_tasks
from approvals.models import ApprovalRequest
from consent.models import ScopePolicy
from tests.approvals.support import ledger_entry, request_approval, session_grant
from tests.approvals.test_inbox_stream import _drop, _Held, held  # noqa: F401  (fixture)
from tests.browser.conftest import watch_page
from tests.browser.test_inbox_browser import _open_inbox, _sign_in, _still_same_document
from tests.conftest import Scenario
from tests.live import LiveStack

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Not the registry entry a test replaces. (shared_task gives a Proxy; celery-types call it the Task.)
REAL_DELIVER = approval_tasks.deliver_prompt._get_current_object()  # type: ignore[attr-defined]
FLOOD = 40
TABS = 3

# Every frame the page sends on its websocket, kept on window for the test to read.
RECORD_SENDS = """
window.__sent = [];
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) { window.__sent.push(JSON.parse(data)); return send.call(this, data); };
"""


@pytest.fixture
def tiny_capacity(settings: Settings) -> Iterator[None]:
    """The sending side's channel layer holds one message per channel: a burst overflows it."""
    from channels.layers import channel_layers

    layers = {**settings.CHANNEL_LAYERS}
    layers["default"] = {**layers["default"], "CONFIG": {**layers["default"]["CONFIG"], "capacity": 1}}
    settings.CHANNEL_LAYERS = layers
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


def _deliver(approval_id: str) -> None:
    try:
        REAL_DELIVER(approval_id)
    finally:
        connections.close_all()


def _sign_in_context(context: BrowserContext, live: LiveStack) -> None:
    """Sign the browser context in once, on a page of its own (the tabs then share its session)."""
    first = context.new_page()
    _sign_in(first, live)
    first.close()


def _tab(context: BrowserContext, live: LiveStack) -> tuple[Page, list[str]]:
    page = context.new_page()
    page.add_init_script(RECORD_SENDS)
    problems = watch_page(page)
    _open_inbox(page)
    return page, problems


def _shown_ids(page: Page) -> set[str]:
    return set(page.eval_on_selector_all("#prompts li.prompt", "els => els.map(e => e.dataset.id)"))


def test_a_flood_past_capacity_shows_every_prompt_on_every_tab(
    live: LiveStack,
    live_context: BrowserContext,
    scenario: Scenario,
    ledger_policy: ScopePolicy,
    held: _Held,  # noqa: F811
    tiny_capacity: None,
    caplog: pytest.LogCaptureFixture,
    settings: Settings,
) -> None:
    caplog.set_level(logging.INFO, logger="channels_redis.core")
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "MAX_PENDING_PER_USER": FLOOD,
        "MAX_PROMPTS_PER_USER_IN_WINDOW": FLOOD,
    }
    _sign_in_context(live_context, live)
    tabs = [_tab(live_context, live) for _ in range(TABS)]

    grant = session_grant(scenario)
    ids = [str(request_approval(grant, [ledger_entry(f"{n}.00")])[0].pk) for n in range(1, FLOOD + 1)]
    assert held.ids == ids
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(_deliver, ids))

    dropped = [r for r in caplog.records if "over capacity" in r.getMessage()]
    assert dropped, "channels_redis dropped nothing: the flood did not overflow the channel"
    assert ApprovalRequest.objects.filter(delivered_at__isnull=False).count() == FLOOD
    for page, problems in tabs:
        expect(page.locator("#prompts li.prompt")).to_have_count(FLOOD, timeout=20_000)
        assert _shown_ids(page) == set(ids)
        expect(page.locator("#pending-badge")).to_have_text(str(FLOOD))
        assert _still_same_document(page), "a tab reloaded to catch up"
        assert problems == [], problems


def test_a_gap_in_the_stream_makes_the_page_resync(
    live: LiveStack,
    live_context: BrowserContext,
    scenario: Scenario,
    ledger_policy: ScopePolicy,
    held: _Held,  # noqa: F811
) -> None:
    _sign_in_context(live_context, live)
    page, problems = _tab(live_context, live)
    grant = session_grant(scenario)

    lost, _ = request_approval(grant, [ledger_entry("1.00")])
    _drop(scenario.user.pk)
    after, _ = request_approval(grant, [ledger_entry("2.00")])
    REAL_DELIVER(str(after.pk))  # arrives one number past the page's next: a gap

    expect(page.locator("#prompts li.prompt")).to_have_count(2)
    assert _shown_ids(page) == {str(lost.pk), str(after.pk)}
    assert {"type": "resync"} in page.evaluate("window.__sent")
    assert _still_same_document(page)
    assert problems == [], problems


def test_a_lost_newest_message_arrives_through_the_periodic_check(
    live: LiveStack,
    live_context: BrowserContext,
    scenario: Scenario,
    ledger_policy: ScopePolicy,
    held: _Held,  # noqa: F811
) -> None:
    _sign_in_context(live_context, live)
    page, problems = _tab(live_context, live)

    lost, _ = request_approval(session_grant(scenario), [ledger_entry("3.00")])
    seq = _drop(scenario.user.pk)  # nothing after it: no gap to see, only the check can tell

    expect(page.locator(f'#prompts li.prompt[data-id="{lost.pk}"]')).to_be_visible(timeout=12_000)
    checks = [m for m in page.evaluate("window.__sent") if m["type"] == "check"]
    assert seq - 1 in [c["seq"] for c in checks]  # the page's position before the lost message
    assert {"type": "resync"} not in page.evaluate("window.__sent")
    assert _still_same_document(page)
    assert problems == [], problems

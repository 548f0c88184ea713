"""A prompt reaches the officer with the inbox closed: Web Push end to end in a real Chromium.

No real push service is reachable here, so the test plays the browser vendor's part: it makes the
subscription's keys as a browser would (P-256 ECDH pair, 16-byte auth secret, RFC 8291 §3),
registers them through the endpoint the inbox's script uses, and runs a push service on loopback
(tests/notify/pushservice.py) that checks the VAPID JWT (RFC 8292) and decrypts the message
(RFC 8291, aes128gcm). The decrypted message is then delivered to the officer's service worker
through the DevTools protocol (``ServiceWorker.deliverPushMessage``), as Chromium's own push
client would; the worker shows the notification; its click opens the prompt; Approve; the agent
collects its action token.
"""

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, CDPSession, Worker, expect
from pytest_django import DjangoDbBlocker, Settings

from approvals.models import ApprovalRequest
from approvals.notify.models import PromptDelivery, PushSubscription
from consent.models import ScopePolicy
from tests.browser.test_inbox_browser import AgentClient, _sign_in
from tests.conftest import OAuthFlow, Scenario
from tests.live import LiveStack, start_stack
from tests.notify.pushservice import PushService

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

HEADLINE = "Append 4250.00 USD to Acme Office Supply (PO-2026-0142) — Financial ledger"
STACK_ENV = {"COUNTERSIGN_PUSH_ALLOW_LOOPBACK": "1", "COUNTERSIGN_EMAIL_DEFAULT_PREFERENCE": "never"}


@pytest.fixture(scope="module")
def reach_stack(
    django_db_setup: None, django_db_blocker: DjangoDbBlocker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    """The live stack, its servers and worker accepting loopback push endpoints (a test's push service)."""
    with (
        django_db_blocker.unblock(),
        start_stack(tmp_path_factory.mktemp("reach"), extra_env=STACK_ENV) as stack,
    ):
        yield stack


@pytest.fixture
def live(reach_stack: LiveStack, transactional_db: None, settings: Settings) -> LiveStack:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "ISSUER": reach_stack.url}
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": reach_stack.url}
    return reach_stack


@pytest.fixture
def agent(
    live: LiveStack, scenario: Scenario, flow: OAuthFlow, ledger_policy: ScopePolicy
) -> Iterator[AgentClient]:
    token: str = flow.full()["access_token"]
    flow.client.logout()
    a = AgentClient(live, scenario, token)
    try:
        yield a
    finally:
        a.close()


def _registration_id(cdp: CDPSession, scope: str, timeout: float = 10.0) -> str:
    """The service worker registration for ``scope``, as DevTools reports it."""
    found: dict[str, str] = {}
    cdp.on(
        "ServiceWorker.workerRegistrationUpdated",
        lambda event: found.update(
            {r["scopeURL"]: r["registrationId"] for r in event["registrations"] if not r.get("isDeleted")}
        ),
    )
    cdp.send("ServiceWorker.enable")
    deadline = time.monotonic() + timeout
    while scope not in found and time.monotonic() < deadline:
        cdp.send("ServiceWorker.enable")  # a no-op that lets the event loop dispatch pending events
        time.sleep(0.1)
    assert scope in found, f"no service worker registered for {scope}: {found}"
    return found[scope]


def _shown_notifications(worker: Worker, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown: list[dict[str, Any]] = (
            worker.evaluate("""async () => (await self.registration.getNotifications()).map(
            n => ({title: n.title, body: n.body, tag: n.tag, data: n.data, url: self.promptUrl(n.data)}))""")
        )
        if shown:
            return shown
        time.sleep(0.2)
    return []


def test_a_push_reaches_the_closed_inbox_and_its_click_opens_the_prompt(
    live: LiveStack, live_context: BrowserContext, scenario: Scenario, agent: AgentClient
) -> None:
    live_context.grant_permissions(["notifications"], origin=live.url)
    page = live_context.new_page()
    _sign_in(page, live)

    # The page is an installable app, with its worker registered for the inbox's scope.
    assert (
        page.evaluate("document.querySelector('link[rel=manifest]').href")
        == f"{live.url}/approvals/manifest.webmanifest"
    )
    assert page.evaluate("navigator.serviceWorker.ready.then(r => r.scope)") == f"{live.url}/approvals/"
    button = page.get_by_role("button", name="Notify me on this device")
    expect(button).to_be_visible()
    vapid_public_key = button.get_attribute("data-vapid-key")

    with PushService() as service:
        endpoint, keys = service.subscribe("officer-laptop")
        # The subscription as the browser's PushSubscription.toJSON() gives it, sent the way push.js sends it.
        status = page.evaluate(
            """async (sub) => (await fetch("/approvals/devices/subscribe/", {
            method: "POST", credentials: "same-origin",
            headers: {"Content-Type": "application/json", "X-Device-Label": "Officer's laptop",
                      "X-CSRFToken": document.querySelector("input[name=csrfmiddlewaretoken]").value},
            body: JSON.stringify(sub)})).status""",
            keys.subscription(endpoint),
        )
        assert status == 201
        device = PushSubscription.objects.get(user=scenario.user)

        cdp = live_context.new_cdp_session(page)
        registration_id = _registration_id(cdp, f"{live.url}/approvals/")
        page.goto("about:blank")  # the laptop's inbox is closed: no Countersign page is open
        assert [p.url for p in live_context.pages] == ["about:blank"]

        asked = agent.ask()
        (message,) = service.wait_for(1)
        assert not service.problems, service.problems
    approval = ApprovalRequest.objects.get()
    # The push service saw a JWT signed with the key the page hands browsers, for its own origin.
    assert message.vapid_key == vapid_public_key and message.claims["aud"] == service.origin
    assert (
        message.payload["body"] == HEADLINE
        and message.payload["url"] == f"/approvals/{approval.pk}/?via=push"
    )

    # Chromium's push client hands the decrypted message to the worker: it shows the notification.
    # Handed again if none shows (a loaded machine can wake the stopped worker too late for the
    # first), as a push service redelivers; the same tag means one notification however many land.
    shown_all: list[dict[str, Any]] = []
    for _ in range(3):
        cdp.send(
            "ServiceWorker.deliverPushMessage",
            {"origin": live.url, "registrationId": registration_id, "data": json.dumps(message.payload)},
        )
        (worker,) = live_context.service_workers
        if shown_all := _shown_notifications(worker):
            break
    (shown,) = shown_all
    assert shown["title"] == "Procurement Agent asks for your approval" and shown["body"] == HEADLINE
    assert shown["tag"] == f"approval-{approval.pk}"
    assert shown["url"] == f"{live.url}/approvals/{approval.pk}/?via=push"

    # The click. Headless Chromium shows no notification that could be clicked, so the
    # notificationclick event is dispatched in the worker, with clients.openWindow watched: the
    # handler must close the notification and open exactly the prompt's URL. Chromium lets only a
    # real click open a window (an untrusted event gets "not allowed"), so the test then opens
    # that URL itself, in the same browser, as the click would have.
    worker.evaluate("""() => {
        self.__opened = [];
        const real = self.clients.openWindow.bind(self.clients);
        self.clients.openWindow = (url) => {
            self.__opened.push(url);
            return real(url).catch((e) => { self.__opened.push("refused: " + e.name); return null; });
        };
        return self.registration.getNotifications().then(([n]) => {
            try { self.dispatchEvent(new NotificationEvent("notificationclick", {notification: n})); }
            catch (e) { /* waitUntil refuses an untrusted event, after the handler started its work */ }
        });
    }""")
    deadline = time.monotonic() + 5
    while not worker.evaluate("self.__opened.length") and time.monotonic() < deadline:
        time.sleep(0.1)
    opened = worker.evaluate("self.__opened")
    assert opened[0] == f"{live.url}/approvals/{approval.pk}/?via=push", opened
    assert opened[1:] in ([], ["refused: InvalidAccessError"]), opened  # refused: not a real click
    assert _shown_notifications(worker, timeout=1) == []  # the click closed it
    windows = [p for p in live_context.pages if p.url.startswith(live.url)]
    prompt_page = windows[0] if windows else live_context.new_page()
    if not windows:
        prompt_page.goto(opened[0])
    prompt_page.wait_for_load_state()
    expect(prompt_page).to_have_url(f"{live.url}/approvals/#prompt-{approval.pk}")
    prompt = prompt_page.locator(f"#prompt-{approval.pk}")
    expect(prompt.get_by_role("heading", name=HEADLINE)).to_be_visible()
    prompt.get_by_role("button", name="Approve").click()
    prompt_page.wait_for_url(f"{live.url}/approvals/")
    expect(prompt_page.get_by_role("status").filter(has_text="Approved:")).to_contain_text(HEADLINE)

    collected = agent.poll(asked["auth_req_id"])
    assert collected.status_code == 200, collected.text
    assert collected.json()["scope"] == "ledger:write" and collected.json()["access_token"].count(".") == 2

    # Each channel's outcome, recorded once, told in the inbox's history and the grant's timeline.
    outcomes = set(
        PromptDelivery.objects.filter(approval=approval).values_list("channel", "outcome", "target")
    )
    assert outcomes == {
        ("websocket", "failed", ""),
        ("push", "delivered", str(device.pk)),
        ("push", "clicked", ""),
    }
    prompt_page.reload()
    history = prompt_page.locator(f'#history tr[data-id="{approval.pk}"]')
    expect(history).to_contain_text(
        "Reached you by: open inbox (failed: no open inbox), "
        "device notification (delivered), device notification (opened)"
    )
    prompt_page.goto(f"/grants/{approval.grant_id}/")
    expect(prompt_page.locator("main")).to_contain_text(
        f"The request “{HEADLINE}” reached you by a notification on your device."
    )
    expect(prompt_page.locator("main")).to_contain_text(f"You opened “{HEADLINE}” from the notification.")

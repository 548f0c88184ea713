"""Fixtures for driving Countersign in a real Chromium (Debian's /usr/bin/chromium) via Playwright.

The app runs under pytest-django's ``live_server`` (a thread in this process, real HTTP on
127.0.0.1), so the data has to be committed: everything here uses ``transactional_db``.
``live_server`` speaks no websockets: the live inbox is tested against ``live`` (tests/live.py: the
real servers, granian + uvicorn behind the path router, and Celery subprocesses) through ``live_context``.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page
from pytest_django import Settings
from pytest_django.live_server_helper import LiveServer

from consent.models import Agent, ScopePolicy
from consent.services import agent_create, resource_server_create, scope_set
from tests.conftest import PASSWORD
from tests.live import LiveStack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
CALLBACK_PATH = "/agent-callback"


@dataclass
class BrowserScenario:
    agent: Agent
    agent_secret: str
    rs_audience: str
    user: User
    base_url: str
    redirect_uri: str


@pytest.fixture
def live_issuer(live_server: LiveServer, settings: Settings) -> str:
    """Make the app's issuer the live server's URL, so tokens and metadata name it."""
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "ISSUER": live_server.url}
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": live_server.url}
    settings.CSRF_TRUSTED_ORIGINS = [live_server.url]
    return live_server.url


@pytest.fixture
def browser_scenario(transactional_db: None, live_issuer: str) -> BrowserScenario:
    """The same registry as tests/conftest.py's ``scenario``, committed, with a reachable callback."""
    for name, aud, sens in [
        ("catalog:read", "http://catalog.test", ScopePolicy.Sensitivity.STANDARD),
        ("budget:read", "http://budget.test", ScopePolicy.Sensitivity.STANDARD),
        ("ledger:write", "http://ledger.test", ScopePolicy.Sensitivity.STEP_UP),
    ]:
        scope_set(name=name, values={"audience": aud, "sensitivity": sens, "description": f"Use {name}"})
    catalog, _ = resource_server_create(name="Catalog", audience="http://catalog.test")
    resource_server_create(name="Ledger", audience="http://ledger.test")
    redirect_uri = f"{live_issuer}{CALLBACK_PATH}"
    agent, secret = agent_create(
        name="Procurement Agent",
        publisher="Acme Agents",
        scopes=["catalog:read", "budget:read", "ledger:write"],
        redirect_uris=[redirect_uri],
    )
    user = get_user_model().objects.create_user("officer", password=PASSWORD)
    return BrowserScenario(agent, secret, catalog.audience, user, live_issuer, redirect_uri)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """One headless Chromium per test module. A missing binary is a failure, not a skip.

    While Playwright's sync API is started, its event loop counts as running on this thread, so
    Django's async-safety check would refuse the test's own (plain, synchronous) ORM calls and the
    database fixtures' setup/teardown. DJANGO_ALLOW_ASYNC_UNSAFE is the documented workaround; it
    is set only while the browser runs (module scope), so tests in other modules keep the check.
    """
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium); "
            f"it is not there or not executable.",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if previous is None:
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(chromium: Browser, live_server: LiveServer) -> Iterator[Page]:
    """A fresh browser context (no cookies) whose agent callback is answered by Playwright itself."""
    context = chromium.new_context(base_url=live_server.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    # No server listens at the agent's redirect URI: Playwright answers it, and page.url keeps
    # the full callback URL with code/state or error.
    page.route(
        f"**{CALLBACK_PATH}**",
        lambda route: route.fulfill(status=200, content_type="text/plain", body="agent callback"),
    )
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page_problems(page: Page) -> list[str]:
    """Console errors, uncaught page errors and failed sub-requests seen while the test runs."""
    problems: list[str] = []
    page.on(
        "console",
        lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None,
    )
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url} {req.failure}"))
    page.on(
        "response",
        lambda resp: problems.append(f"HTTP {resp.status}: {resp.url}") if resp.status >= 400 else None,
    )
    return problems


# --- the live stack (its ws process serves websockets; pytest-django's live_server does not) -------


@pytest.fixture
def live_context(chromium: Browser, live: LiveStack) -> Iterator[BrowserContext]:
    """A fresh browser context (no cookies) against the live stack: real servers, real Celery."""
    context = chromium.new_context(base_url=live.url)
    context.set_default_timeout(15_000)
    try:
        yield context
    finally:
        context.close()


def watch_page(page: Page) -> list[str]:
    """Console errors, uncaught errors, dialogs (alert() would mean injected script ran), HTTP errors."""
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        url = msg.location.get("url") or ""
        # Chromium asks for /favicon.ico by itself; the app has none (no <link rel="icon">), a 404
        # that says nothing about the page under test.
        if msg.type == "error" and not url.endswith("/favicon.ico"):
            problems.append(f"console {msg.type}: {msg.text} ({url})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url} {req.failure}"))
    page.on(
        "response",
        lambda resp: problems.append(f"HTTP {resp.status}: {resp.url}") if resp.status >= 400 else None,
    )

    def on_dialog(dialog: Dialog) -> None:
        problems.append(f"dialog {dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return problems

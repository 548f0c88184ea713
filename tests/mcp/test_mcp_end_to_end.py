"""A stock MCP client (the official ``mcp`` SDK, its own OAuth client provider) against examples/mcp.

Real processes only: Countersign (a live stack of its own, whose CIMD fetches trust the test's TLS
certificate), ``python -m examples.mcp.server``, an https server for the client's metadata document,
a loopback callback listener, and Chromium for the officer. The client discovers everything from
RFC 9728 and RFC 8414 metadata, joins by CIMD (or dynamic registration), the officer consents;
``catalog_search`` works on the session grant; ``ledger_append`` waits until the officer answers
in the inbox: approved, it returns the ledger's receipt; denied, expired or revoked, a tool error.
"""

import asyncio
import datetime
import ipaddress
import json
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import Browser, BrowserContext, Page, expect
from pytest_django import DjangoDbBlocker, Settings

from approvals.models import ApprovalRequest
from consent.models import Agent, ScopePolicy, SessionGrant
from consent.services import grant_revoke, resource_server_create, scope_set
from tests.browser.conftest import chromium, watch_page  # noqa: F401  (fixtures)
from tests.conftest import PASSWORD
from tests.live import ROOT, LiveStack, free_port, start_stack

if TYPE_CHECKING:
    from mcp.types import CallToolResult

Codes = queue.Queue[tuple[str, str | None]]  # (code, state) from the loopback redirect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

ARGS = {"amount": "1250.00", "currency": "EUR", "vendor": "Nordlicht GmbH", "purchase_order": "PO-2026-0077"}


def _self_signed(tmp: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cimd.pem", tmp / "cimd.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


class Served(ThreadingHTTPServer):
    daemon_threads = True


def _serve(
    handler: type[BaseHTTPRequestHandler], *, tls: tuple[str, str] | None = None
) -> tuple[Served, int]:
    httpd = Served(("127.0.0.1", 0), handler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def stack(
    django_db_setup: None,
    django_db_blocker: DjangoDbBlocker,
    tmp_path_factory: pytest.TempPathFactory,
    tls: tuple[str, str],
) -> Iterator[LiveStack]:
    with (
        django_db_blocker.unblock(),
        start_stack(
            tmp_path_factory.mktemp("mcp-live"), extra_env={"COUNTERSIGN_CIMD_CA_BUNDLE": tls[0]}
        ) as live,
    ):
        yield live


@pytest.fixture
def live(stack: LiveStack, transactional_db: None, settings: Settings) -> LiveStack:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "ISSUER": stack.url}
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": stack.url}
    return stack


@pytest.fixture
def callback() -> Iterator[tuple[str, Codes]]:
    """The MCP client's loopback redirect URI (RFC 8252 §7.3): hands (code, state) to the client."""
    codes: queue.Queue[tuple[str, str | None]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            params = parse_qs(urlsplit(self.path).query)
            if "code" in params:
                state = params["state"][0] if "state" in params else None
                codes.put((params["code"][0], state))
            body = b"<!doctype html><title>Connected</title><h1>MCP client connected</h1>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd, port = _serve(Handler)
    yield f"http://127.0.0.1:{port}/callback", codes
    httpd.shutdown()


@pytest.fixture
def client_document(tls: tuple[str, str], callback: tuple[str, Codes]) -> Iterator[str]:
    """The MCP client's Client ID Metadata Document, over https on loopback."""
    holder: dict[str, dict[str, Any]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps(holder["doc"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "max-age=300")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd, port = _serve(Handler, tls=tls)
    url = f"https://127.0.0.1:{port}/mcp-client.json"
    holder["doc"] = {
        "client_id": url,
        "client_name": "Test MCP Client",
        "redirect_uris": [callback[0]],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }
    yield url
    httpd.shutdown()


@pytest.fixture
def mcp_server(live: LiveStack, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    audience = f"http://127.0.0.1:{port}/mcp"
    scope_set(name="shop:catalog", values={"audience": audience, "description": "Search the shop's catalog"})
    scope_set(
        name="shop:ledger",
        values={
            "audience": audience,
            "description": "Record payments in the ledger",
            "sensitivity": ScopePolicy.Sensitivity.STEP_UP,
            "approval_window": 600,
            "authorization_details_types": ["mcp_tool_call"],
        },
    )
    rs, secret = resource_server_create(name="Shop (MCP server)", audience=audience)
    get_user_model().objects.create_user("officer", password=PASSWORD)
    config = {
        "issuer": live.url,
        "resource_servers": [
            {"name": rs.name, "audience": audience, "client_id": rs.client_id, "client_secret": secret}
        ],
        "scopes": [
            {"name": "shop:catalog", "sensitivity": "standard", "audience": audience},
            {"name": "shop:ledger", "sensitivity": "step_up", "audience": audience},
        ],
    }
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(config))
    log = tmp_path / "mcp.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.mcp.server", "--config", str(path), "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COUNTERSIGN_ISSUER": live.url},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if (
                httpx.get(
                    f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp",
                    timeout=1,
                    trust_env=False,
                ).status_code
                == 200
            ):
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the MCP server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield audience, log
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


class McpClient:
    """The official SDK client in a thread of its own (the browser runs on this one)."""

    def __init__(
        self, server_url: str, redirect_uri: str, codes: Codes, *, client_metadata_url: str | None
    ) -> None:
        self.server_url, self.redirect_uri, self.codes = server_url, redirect_uri, codes
        self.client_metadata_url = client_metadata_url
        self.authorize_urls: queue.Queue[str] = queue.Queue()
        self.calls: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.results: queue.Queue[CallToolResult | BaseException] = queue.Queue()
        self.progress: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        from mcp import ClientSession
        from mcp.client.auth import OAuthClientProvider
        from mcp.client.streamable_http import streamablehttp_client
        from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
        from pydantic import AnyUrl

        class Memory:
            def __init__(self) -> None:
                self.tokens: OAuthToken | None = None
                self.info: OAuthClientInformationFull | None = None

            async def get_tokens(self) -> OAuthToken | None:
                return self.tokens

            async def set_tokens(self, tokens: OAuthToken) -> None:
                self.tokens = tokens

            async def get_client_info(self) -> OAuthClientInformationFull | None:
                return self.info

            async def set_client_info(self, info: OAuthClientInformationFull) -> None:
                self.info = info

        async def redirect_handler(url: str) -> None:
            self.authorize_urls.put(url)

        async def callback_handler() -> tuple[str, str | None]:
            return await asyncio.to_thread(self.codes.get, True, 60)

        metadata = OAuthClientMetadata(
            client_name="Test MCP Client",
            redirect_uris=[AnyUrl(self.redirect_uri)],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        )
        auth = OAuthClientProvider(
            self.server_url,
            metadata,
            Memory(),
            redirect_handler,
            callback_handler,
            timeout=60,
            client_metadata_url=self.client_metadata_url,
        )

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            self.progress.append(message or "")

        try:
            async with (
                streamablehttp_client(self.server_url, auth=auth) as (read, write, _),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                while True:
                    name, arguments = await asyncio.to_thread(self.calls.get)
                    if not name:
                        break
                    result = await session.call_tool(
                        name,
                        arguments,
                        progress_callback=on_progress,
                        read_timeout_seconds=datetime.timedelta(seconds=90),
                    )
                    self.results.put(result)
        except BaseException as exc:  # noqa: BLE001  (reported to the test)
            self.results.put(exc)

    def call(self, name: str, arguments: dict[str, Any], timeout: float = 60) -> "CallToolResult":
        self.calls.put((name, arguments))
        result = self.results.get(timeout=timeout)
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        self.calls.put(("", {}))
        self.thread.join(timeout=15)


def _text(result: "CallToolResult") -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def _connect(page: Page, client: McpClient, live: LiveStack, *, expect_self_asserted: str) -> None:
    """The client's first call meets a 401; it discovers, joins, and sends the officer to consent."""
    url = client.authorize_urls.get(timeout=60)
    assert url.startswith(f"{live.url}/o/authorize/?") and "resource=" in url and "code_challenge=" in url
    page.goto(url)
    page.wait_for_url(re.compile(r"/accounts/login/\?"))
    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/o/authorize/\?"))
    expect(page.locator("#self-asserted")).to_contain_text(expect_self_asserted)
    expect(page.get_by_role("list", name="Will ask you each time")).to_contain_text("shop:ledger")
    page.get_by_role("button", name="Allow").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("MCP client connected")


def _decide(page: Page, live: LiveStack, decision: str) -> None:
    page.goto(f"{live.url}/approvals/")
    heading = page.get_by_role(
        "heading", name=re.compile(r"^Run ledger_append: 1250\.00 EUR to Nordlicht GmbH")
    )
    expect(heading).to_be_visible(timeout=30_000)
    page.locator("#prompts li.prompt").filter(has=heading).get_by_role("button", name=decision).click()
    page.wait_for_url(f"{live.url}/approvals/")


def _session(
    chromium: Browser,  # noqa: F811
    live: LiveStack,
    mcp_server: tuple[str, Path],
    callback: tuple[str, Codes],
    client_metadata_url: str | None,
) -> tuple[BrowserContext, Page, McpClient, Path]:
    audience, log = mcp_server
    context = chromium.new_context(base_url=live.url)
    context.set_default_timeout(20_000)
    page = context.new_page()
    client = McpClient(audience, callback[0], callback[1], client_metadata_url=client_metadata_url)
    client.thread.start()
    return context, page, client, log


def _run_catalog_then_ledger(
    chromium: Browser,  # noqa: F811
    live: LiveStack,
    mcp_server: tuple[str, Path],
    callback: tuple[str, Codes],
    *,
    metadata_url: str | None,
    decide: Callable[[Page], None],
) -> tuple["CallToolResult", McpClient]:
    context, page, client, log = _session(chromium, live, mcp_server, callback, metadata_url)
    problems = watch_page(page)
    try:
        client.calls.put(("catalog_search", {"query": "nordlicht"}))
        host = "127.0.0.1"
        _connect(page, client, live, expect_self_asserted=host)
        found = client.results.get(timeout=60)
        assert not isinstance(found, BaseException), (found, log.read_text(), live.logs())
        assert not found.isError and "NORD-SCRN-11" in _text(found), _text(found)
        client.calls.put(("ledger_append", ARGS))
        started = time.monotonic()
        decide(page)
        result = client.results.get(timeout=120)
        assert not isinstance(result, BaseException), (result, log.read_text())
        assert time.monotonic() - started < 90
        assert problems == [] or all("HTTP 4" not in p for p in problems), problems
        return result, client
    finally:
        client.close()
        context.close()


def test_cimd_client_consents_searches_and_gets_the_ledger_receipt_after_approval(
    live: LiveStack,
    chromium: Browser,  # noqa: F811
    mcp_server: tuple[str, Path],
    callback: tuple[str, Codes],
    client_document: str,
) -> None:
    result, client = _run_catalog_then_ledger(
        chromium,
        live,
        mcp_server,
        callback,
        metadata_url=client_document,
        decide=lambda page: _decide(page, live, "Approve"),
    )
    text = _text(result)
    assert not result.isError, text
    assert text.startswith("Ledger receipt L-0001: 1250.00 EUR to Nordlicht GmbH for PO-2026-0077"), text
    agent = Agent.objects.get(client_id=client_document)
    assert agent.registration == Agent.Registration.METADATA_DOCUMENT and agent.status == Agent.Status.ACTIVE
    approval = ApprovalRequest.objects.get()
    assert approval.status == ApprovalRequest.Status.REDEEMED and approval.opened_by is not None
    assert approval.authorization_details == [
        {"type": "mcp_tool_call", "server": mcp_server[0], "tool": "ledger_append", "arguments": ARGS}
    ]
    assert any("approval" in m.lower() for m in client.progress), client.progress


def test_registered_client_gets_the_ledger_receipt_after_approval(
    live: LiveStack,
    chromium: Browser,  # noqa: F811
    mcp_server: tuple[str, Path],
    callback: tuple[str, Codes],
) -> None:
    result, _ = _run_catalog_then_ledger(
        chromium,
        live,
        mcp_server,
        callback,
        metadata_url=None,
        decide=lambda page: _decide(page, live, "Approve"),
    )
    assert not result.isError and _text(result).startswith("Ledger receipt L-0001: 1250.00 EUR"), _text(
        result
    )
    agent = Agent.objects.get()
    assert agent.registration == Agent.Registration.DYNAMIC and agent.metadata_source.startswith(
        "registration"
    )
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.REDEEMED


def test_registered_client_is_denied_and_gets_a_tool_error(
    live: LiveStack,
    chromium: Browser,  # noqa: F811
    mcp_server: tuple[str, Path],
    callback: tuple[str, Codes],
) -> None:
    result, _ = _run_catalog_then_ledger(
        chromium,
        live,
        mcp_server,
        callback,
        metadata_url=None,
        decide=lambda page: _decide(page, live, "Deny"),
    )
    assert result.isError and "denied" in _text(result), _text(result)
    assert Agent.objects.get().registration == Agent.Registration.DYNAMIC
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.DENIED


def test_expired_and_revoked_approvals_end_the_call_with_a_tool_error(
    live: LiveStack,
    chromium: Browser,  # noqa: F811
    mcp_server: tuple[str, Path],
    callback: tuple[str, Codes],
) -> None:
    ScopePolicy.objects.filter(name="shop:ledger").update(approval_window=10)

    def let_it_expire(page: Page) -> None:
        deadline = time.monotonic() + 30
        while not ApprovalRequest.objects.exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    expired, client = _run_catalog_then_ledger(
        chromium, live, mcp_server, callback, metadata_url=None, decide=let_it_expire
    )
    assert expired.isError and "expired" in _text(expired), _text(expired)

    ScopePolicy.objects.filter(name="shop:ledger").update(approval_window=600)
    context, page, client, log = _session(chromium, live, mcp_server, callback, None)
    try:
        client.calls.put(("catalog_search", {"query": "acme"}))
        _connect(page, client, live, expect_self_asserted="127.0.0.1")
        found = client.results.get(timeout=60)
        assert not isinstance(found, BaseException) and not found.isError, found
        client.calls.put(("ledger_append", ARGS))
        deadline = time.monotonic() + 30
        while not ApprovalRequest.objects.filter(status="pending").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        grant = SessionGrant.objects.filter(status="active").latest("created")
        assert grant_revoke(grant_id=grant.pk, reason="revoked_by_user", actor="user:test")
        revoked = client.results.get(timeout=60)
        assert not isinstance(revoked, BaseException), revoked
        assert revoked.isError and "revoked" in _text(revoked), _text(revoked)
    finally:
        client.close()
        context.close()

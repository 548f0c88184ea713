"""How the servers are run (config.serving, config.router, config.wsgi) and what that must not change.

The router is driven against two small backends of our own that answer with what they received, so
each test sees exactly which server a request reached and with which bytes.
"""

import asyncio
import io
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections

from config.router import _serve
from config.serving import local_command, web_command, ws_command
from consent.models import SessionGrant
from tests.conftest import OAuthFlow, Scenario

T = TypeVar("T")

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter

# --- the server commands ----------------------------------------------------------------------------


def test_web_is_granian_wsgi_and_ws_is_uvicorn_channels_on_the_given_port() -> None:
    web = web_command(8123, "0.0.0.0", threads=3)
    assert web[:3] == [sys.executable, "-m", "granian"]
    assert web[web.index("--interface") + 1] == "wsgi" and "config.wsgi:application" in web
    assert web[web.index("--port") + 1] == "8123" and web[web.index("--host") + 1] == "0.0.0.0"
    assert web[web.index("--workers") + 1] == "1" and web[web.index("--blocking-threads") + 1] == "3"
    forked = web_command(8123, workers=2)  # two web processes on the one port (benchmarks of two cores)
    assert forked[forked.index("--workers") + 1] == "2"
    ws = ws_command(9123)
    assert ws[:3] == [sys.executable, "-m", "uvicorn"] and "config.asgi:application" in ws
    assert ws[ws.index("--port") + 1] == "9123"
    assert local_command(8000)[1:4] == ["-m", "config.serving", "local"]


# --- the path router --------------------------------------------------------------------------------


async def _backend(name: str) -> tuple[asyncio.Server, int]:
    """An HTTP/1.1 server answering every request with JSON naming itself, the path, headers and body."""

    async def handle(reader: Reader, writer: Writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                body = b""
                if "Content-Length" in headers:
                    body = await reader.readexactly(int(headers["Content-Length"]))
                elif headers.get("Transfer-Encoding") == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                        body += (await reader.readexactly(size + 2))[:-2]  # size 0: the final CRLF
                        if size == 0:
                            break
                payload = json.dumps(
                    {
                        "server": name,
                        "path": lines[0].split(" ")[1],
                        "headers": headers,
                        "body": body.decode(),
                    }
                ).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _response(reader: Reader) -> dict[str, Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    response: dict[str, Any] = json.loads(await reader.readexactly(length))
    return response


def _through_router(exchange: Callable[[Reader, Writer], Awaitable[T]]) -> T:
    """Run ``exchange(reader, writer)`` on one client connection to a router over the two backends."""

    async def main() -> T:
        web, web_port = await _backend("web")
        ws, ws_port = await _backend("ws")
        stop = asyncio.Event()
        bound: list[int] = []
        router = asyncio.create_task(
            _serve(
                "127.0.0.1",
                0,
                ("127.0.0.1", web_port),
                ("127.0.0.1", ws_port),
                alive=lambda: True,
                stopped=stop.is_set,
                bound=bound,
            )
        )
        while not bound:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", bound[0])
        try:
            return await asyncio.wait_for(exchange(reader, writer), timeout=20)
        finally:
            writer.close()
            stop.set()
            await router
            web.close()
            ws.close()

    return asyncio.run(main())


def test_router_routes_each_request_on_a_kept_alive_connection_by_its_path() -> None:
    async def exchange(reader: Reader, writer: Writer) -> list[dict[str, Any]]:
        seen = []
        for path in ("/healthz", "/.well-known/jwks.json", "/ws/approvals/"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            seen.append(await _response(reader))
        return seen

    seen = _through_router(exchange)
    assert [(r["server"], r["path"]) for r in seen] == [
        ("web", "/healthz"),
        ("web", "/.well-known/jwks.json"),
        ("ws", "/ws/approvals/"),
    ]


def test_router_forwards_bodies_whole_and_the_next_request_after_them() -> None:
    form = "grant_type=client_credentials&scope=" + "x" * 70_000  # more than one read's worth

    async def exchange(
        reader: Reader, writer: Writer
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        writer.write(
            f"POST /o/token/ HTTP/1.1\r\nHost: h\r\nContent-Length: {len(form)}\r\n\r\n{form}".encode()
        )
        first = await _response(reader)
        writer.write(
            b"POST /o/introspect/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"6\r\ntoken=\r\n3;ext=1\r\nabc\r\n0\r\n\r\n"
        )
        second = await _response(reader)
        writer.write(b"GET /ws/approvals/ HTTP/1.1\r\nHost: h\r\n\r\n")
        return first, second, await _response(reader)

    first, second, third = _through_router(exchange)
    assert (first["server"], first["body"]) == ("web", form)
    assert (second["server"], second["path"], second["body"]) == ("web", "/o/introspect/", "token=abc")
    assert third["server"] == "ws"


def test_router_replaces_a_client_supplied_x_forwarded_for_with_the_peer() -> None:
    async def exchange(reader: Reader, writer: Writer) -> dict[str, Any]:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n")
        return await _response(reader)

    assert _through_router(exchange)["headers"]["X-Forwarded-For"] == "127.0.0.1"


def test_router_refuses_a_malformed_request() -> None:
    async def exchange(reader: Reader, writer: Writer) -> bytes:
        writer.write(b"POST /o/token/ HTTP/1.1\r\nHost: h\r\nContent-Length: 1e3\r\n\r\n")
        return await reader.read(200)

    assert _through_router(exchange).startswith(b"HTTP/1.1 400 ")


# --- the WSGI entry point -------------------------------------------------------------------------


def _wsgi(
    path: str,
    *,
    method: str = "GET",
    peer: str = "127.0.0.1",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    from config.wsgi import application

    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "HTTP_HOST": "127.0.0.1:8000",
        "REMOTE_ADDR": peer,
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        **(headers or {}),
    }
    status: list[str] = []

    def start_response(
        status_line: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        status.append(status_line)
        return lambda data: None  # write(): Django's handler never calls it

    # As Django's test client does: the test's transaction must outlive the request.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        content = b"".join(application(environ, start_response))
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return int(status[0].split()[0]), content


def test_metrics_stays_closed_to_a_remote_client_behind_the_proxy(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METRICS_TOKEN", raising=False)
    assert _wsgi("/metrics")[0] == 200  # loopback itself
    assert _wsgi("/metrics", headers={"HTTP_X_FORWARDED_FOR": "203.0.113.7"})[0] == 403
    # A client cannot pose as loopback: the proxy's own entry is the last one.
    assert _wsgi("/metrics", headers={"HTTP_X_FORWARDED_FOR": "127.0.0.1, 203.0.113.7"})[0] == 403
    # Forwarding headers from a peer that is not a trusted proxy are ignored.
    assert _wsgi("/metrics", peer="203.0.113.8", headers={"HTTP_X_FORWARDED_FOR": "127.0.0.1"})[0] == 403


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_token_endpoint_reads_a_chunked_body_as_it_reads_a_sized_one(db: None, framing: str) -> None:
    body = b"grant_type=urn%3Aexample%3Anone"
    headers = {"CONTENT_TYPE": "application/x-www-form-urlencoded"}
    headers.update(
        {"CONTENT_LENGTH": str(len(body))}
        if framing == "content-length"
        else {"HTTP_TRANSFER_ENCODING": "chunked"}
    )
    status, content = _wsgi("/o/token/", method="POST", body=body, headers=headers)
    assert (status, json.loads(content)["error"]) == (400, "unsupported_grant_type")


# --- messages skipped on protocol paths, kept for pages ----------------------------------------------


def test_a_flash_message_survives_protocol_requests_and_shows_once_on_the_next_page(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    tokens = flow.full(scope="catalog:read")
    grant = SessionGrant.objects.get()
    assert flow.client.post(f"/grants/{grant.pk}/revoke/").status_code == 302
    assert flow.client.get("/.well-known/oauth-authorization-server").status_code == 200
    assert flow.introspect(tokens["access_token"]).json() == {"active": False}
    assert flow.client.get("/healthz").status_code == 200
    assert "Access revoked." in flow.client.get("/grants/").content.decode()
    assert "Access revoked." not in flow.client.get("/grants/").content.decode()

"""The path router ``make run`` and the test fixtures put on the public port, in place of a load balancer.

HTTP/1.1 only, loopback backends: every request whose path starts with ``/ws/`` goes to the ws
process (uvicorn, Channels), every other request to the web process (granian, WSGI) — the rule
the production load balancer applies (docs/deployment.md). Routing is per request, not per
connection, so a browser reusing a kept-alive connection for any path still reaches the right
server; a ``/ws/`` request hands its connection to the ws process for good (the websocket
upgrade). ``X-Forwarded-For`` is replaced by the peer's address, as a proxy in front must.

Request bodies are framed by ``Content-Length`` or chunked transfer coding (RFC 9112 §6);
responses are relayed as bytes, unparsed. Not for production: use a real proxy there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

MAX_HEAD = 64 * 1024
CHUNK = 64 * 1024
_DROPPED = (b"x-forwarded-for:",)
# Every open socket, client and backend side, so that stopping the router closes them at once:
# a backend shutting down gracefully waits for its connections to go away.
_open: set[asyncio.StreamWriter] = set()


class BadRequest(Exception):
    pass


def _split_head(head: bytes) -> tuple[bytes, list[bytes]]:
    lines = head[:-4].split(b"\r\n")
    return lines[0], lines[1:]


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    prefix = name.lower() + b":"
    values = [line[len(prefix) :].strip() for line in lines if line.lower().startswith(prefix)]
    if len(values) > 1 and name == b"content-length" and len(set(values)) > 1:
        raise BadRequest("conflicting Content-Length")
    return values[0] if values else None


async def _copy_exactly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        writer.write(data)
        await writer.drain()
        n -= len(data)


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        writer.write(size_line)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise BadRequest("bad chunk size") from exc
        if size == 0:
            while True:  # trailer fields, then the empty line
                line = await reader.readuntil(b"\r\n")
                writer.write(line)
                if line == b"\r\n":
                    await writer.drain()
                    return
        await _copy_exactly(reader, writer, size + 2)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass


class _Upstream:
    def __init__(
        self,
        kind: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self.kind, self.reader, self.writer = kind, reader, writer
        _open.add(writer)
        self.relay = asyncio.create_task(_pipe(reader, client_writer))

    async def close(self) -> None:
        self.relay.cancel()
        _open.discard(self.writer)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def _handle(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    web: tuple[str, int],
    ws: tuple[str, int],
) -> None:
    peer = (client_writer.get_extra_info("peername") or ("127.0.0.1",))[0]
    _open.add(client_writer)
    upstream: _Upstream | None = None
    try:
        while True:
            try:
                head = await client_reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                client_writer.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )
                return
            request_line, lines = _split_head(head)
            parts = request_line.split(b" ")
            if len(parts) != 3:
                raise BadRequest("bad request line")
            kind = "ws" if parts[1].startswith(b"/ws/") else "web"
            if upstream is not None and (upstream.kind != kind or upstream.relay.done()):
                await upstream.close()
                upstream = None
            if upstream is None:
                try:
                    reader, writer = await asyncio.open_connection(
                        *(ws if kind == "ws" else web), limit=MAX_HEAD
                    )
                except OSError:
                    client_writer.write(
                        b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                    )
                    return
                upstream = _Upstream(kind, reader, writer, client_writer)
            kept = [line for line in lines if not line.lower().startswith(_DROPPED)]
            upstream.writer.write(
                b"\r\n".join([request_line, *kept, b"X-Forwarded-For: " + peer.encode(), b"", b""])
            )
            if kind == "ws":  # the connection now belongs to the websocket (or to uvicorn's refusal)
                to_server = asyncio.create_task(_pipe(client_reader, upstream.writer))
                await asyncio.wait({to_server, upstream.relay}, return_when=asyncio.FIRST_COMPLETED)
                # Either side ending ends the tunnel: a server that closed the websocket has sent its
                # close frame, and the client waits for the connection to go before it reports it.
                to_server.cancel()
                return
            transfer_encoding = _header(lines, b"transfer-encoding")
            length = _header(lines, b"content-length")
            if transfer_encoding is not None:
                if transfer_encoding.lower() != b"chunked":
                    raise BadRequest("unsupported transfer coding")
                await _copy_chunked(client_reader, upstream.writer)
            elif length is not None:
                if not length.isdigit():
                    raise BadRequest("bad Content-Length")
                await _copy_exactly(client_reader, upstream.writer, int(length))
            await upstream.writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away (or closed its keep-alive connection)
    except BadRequest:
        client_writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    finally:
        if upstream is not None:
            # Let the last response finish before closing the client's side.
            with contextlib.suppress(Exception):
                upstream.writer.write_eof()
                await asyncio.wait_for(asyncio.shield(upstream.relay), timeout=30)
            await upstream.close()
        _open.discard(client_writer)
        client_writer.close()
        with contextlib.suppress(Exception):
            await client_writer.wait_closed()


async def _serve(
    host: str,
    port: int,
    web: tuple[str, int],
    ws: tuple[str, int],
    alive: Callable[[], bool],
    stopped: Callable[[], bool],
    bound: list[int] | None = None,
) -> bool:
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, web, ws), host, port, limit=MAX_HEAD, reuse_address=True
    )
    if bound is not None:
        bound.append(server.sockets[0].getsockname()[1])
    try:
        while alive():
            if stopped():
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        server.close()
        for writer in list(_open):
            writer.transport.abort()
        _open.clear()


def serve(
    host: str,
    port: int,
    *,
    web: tuple[str, int],
    ws: tuple[str, int],
    alive: Callable[[], bool] = lambda: True,
    stopped: Callable[[], bool] = lambda: False,
) -> bool:
    """Route ``host:port`` to the two backends until ``stopped()`` (returns True) or not ``alive()`` (False)."""
    return asyncio.run(_serve(host, port, web, ws, alive, stopped))

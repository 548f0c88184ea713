"""ASGI middleware for resource servers: every HTTP request (and websocket handshake)
must carry a valid Countersign session token (RFC 9068), DPoP-checked when bound
(RFC 9449 §7.1).

.. code-block:: python

    app = CountersignMiddleware(app, verifier, required_scopes=["catalog:read"])

The verified token is put in ``scope["countersign"]``; a refusal is a JSON
response with the RFC 6750 §3 challenge naming the RFC 9728 metadata URL (§5.1;
a websocket is closed with 1008). The metadata itself (RFC 9728 §3) is served,
without a token, at both ``/.well-known/oauth-protected-resource`` paths.
Verification runs in a worker thread, as a cache miss may need the network.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .errors import CountersignError
from .resource_metadata import metadata_paths
from .verifier import TokenVerifier, VerifiedToken, parse_authorization

__all__ = ["CountersignMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> str | None:
    values = [v for k, v in scope.get("headers", []) if k.lower() == name]
    if len(values) != 1:
        return None if not values else ",".join(v.decode("latin-1") for v in values)
    return str(values[0].decode("latin-1"))


class CountersignMiddleware:
    """Protect an ASGI app with :class:`TokenVerifier` (session tokens).

    ``public_url``: the scheme and host clients use (e.g. behind a proxy), for the DPoP
    ``htu`` check; by default taken from the request. ``exempt_paths``: path prefixes
    served without a token (health checks).
    """

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        required_scopes: Iterable[str] = (),
        *,
        public_url: str | None = None,
        exempt_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.required_scopes = tuple(required_scopes)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.exempt_paths = tuple(exempt_paths)
        self.metadata_paths = (
            frozenset(metadata_paths(verifier.audience)) if verifier.resource_metadata_url else frozenset()
        )

    def _url(self, scope: Scope) -> str:
        path = str(scope.get("root_path", "")) + str(scope.get("path", "/"))
        if self.public_url:
            return self.public_url + path
        raw_scheme = str(scope.get("scheme", "http"))
        scheme = {"ws": "http", "wss": "https"}.get(raw_scheme, raw_scheme)
        host = _header(scope, b"host")
        if not host:
            server = scope.get("server") or ("localhost", None)
            host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        return f"{scheme}://{host}{path}"

    def _verify(self, scope: Scope) -> VerifiedToken:
        scheme, token = parse_authorization(_header(scope, b"authorization"))
        method = scope.get("method", "GET")
        return self.verifier.verify_session(
            token,
            required_scopes=self.required_scopes,
            dpop_proof=_header(scope, b"dpop"),
            htm=method,
            htu=self._url(scope),
            scheme=scheme,
        )

    async def _send_json(self, send: Send, status: int, body: Any, headers: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        raw_headers += [(k.lower().encode(), v.encode("latin-1", "replace")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and path in self.metadata_paths:
            # RFC 9728 §3.2: the resource's metadata, public, at both §3.1 paths.
            if scope.get("method") in ("GET", "HEAD"):
                await self._send_json(
                    send,
                    200,
                    self.verifier.protected_resource_metadata(),
                    {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"},
                )
            else:
                await self._send_json(send, 405, {"error": "invalid_request"}, {"Allow": "GET, HEAD"})
            return
        # Whole path segments: "/health" exempts "/health" and "/health/...", not "/healthz".
        exempt = any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.exempt_paths)
        if scope["type"] not in ("http", "websocket") or exempt:
            await self.app(scope, receive, send)
            return
        try:
            verified = await asyncio.to_thread(self._verify, scope)
        except CountersignError as exc:
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008, "reason": exc.error})
                return
            status, headers, body = self.verifier.refusal(exc)
            await self._send_json(send, status, body, headers)
            return
        scope["countersign"] = verified
        await self.app(scope, receive, send)

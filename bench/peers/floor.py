"""The floor: what a client-credentials token endpoint minimally must do, with no framework.

POST /token with HTTP Basic client authentication (RFC 6749 §2.3.1) and
``grant_type=client_credentials``: one SELECT of the client by ``client_id``, a
constant-time compare of a salted SHA-256 of the secret, an ES256 JWT access
token (RFC 9068 ``typ: at+jwt``) signed with PyJWT (key loaded once), one INSERT
of the token's ``jti``, one commit, a JSON response. ``GET /healthz`` answers 200.

Both a WSGI callable (``application``) and an ASGI one (``asgi_application``), so
it runs under whichever server program the web process uses. Configured by
``FLOOR_DATABASE_URL``, ``FLOOR_KEY_PATH`` (PKCS#8 PEM, P-256) and ``FLOOR_ISSUER``.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIEnvironment

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SELECT = "SELECT secret_salt, secret_hash FROM floor_client WHERE client_id = %s"
INSERT = "INSERT INTO floor_token (jti, client_id, expires) VALUES (%s, %s, to_timestamp(%s))"
LIFETIME = 900

with open(os.environ["FLOOR_KEY_PATH"], "rb") as fh:
    _key = serialization.load_pem_private_key(fh.read(), password=None)
assert isinstance(_key, ec.EllipticCurvePrivateKey), "FLOOR_KEY_PATH must hold a P-256 key"
KEY: ec.EllipticCurvePrivateKey = _key
ISSUER = os.environ.get("FLOOR_ISSUER", "http://127.0.0.1")
DATABASE_URL = os.environ["FLOOR_DATABASE_URL"]
HEADERS = {"typ": "at+jwt", "kid": "floor-1"}


def secret_hash(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}${secret}".encode()).hexdigest()


def client_from(authorization: str) -> tuple[str, str] | None:
    if not authorization.startswith("Basic "):
        return None
    try:
        client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
    except ValueError:
        return None
    return client_id, secret


def mint(client_id: str) -> tuple[str, str, int]:
    now = int(time.time())
    jti = secrets.token_urlsafe(16)
    claims = {
        "iss": ISSUER,
        "sub": client_id,
        "aud": ISSUER,
        "client_id": client_id,
        "iat": now,
        "exp": now + LIFETIME,
        "jti": jti,
    }
    return jwt.encode(claims, KEY, algorithm="ES256", headers=HEADERS), jti, now + LIFETIME


def body_for(token: str) -> bytes:
    return json.dumps({"access_token": token, "token_type": "Bearer", "expires_in": LIFETIME}).encode()


ERROR = {
    400: json.dumps({"error": "unsupported_grant_type"}).encode(),
    401: json.dumps({"error": "invalid_client"}).encode(),
    404: b'{"error": "not_found"}',
}


def check(row: tuple[Any, ...] | None, secret: str) -> bool:
    return row is not None and hmac.compare_digest(secret_hash(row[0], secret), row[1])


# --- WSGI --------------------------------------------------------------------------------------------

_pool: "ConnectionPool | None" = None
_pool_lock = threading.Lock()


def pool() -> "ConnectionPool":
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                from psycopg_pool import ConnectionPool

                _pool = ConnectionPool(DATABASE_URL, min_size=1, max_size=8, open=True)
    return _pool


def _wsgi_response(start_response: StartResponse, status: int, body: bytes) -> list[bytes]:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}[status]
    start_response(
        f"{status} {reason}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD")
    if path == "/healthz":
        return _wsgi_response(start_response, 200, b"{}")
    if path != "/token" or method != "POST":
        return _wsgi_response(start_response, 404, ERROR[404])
    length = int(environ.get("CONTENT_LENGTH") or 0)
    form = parse_qs(environ["wsgi.input"].read(length).decode())
    if form.get("grant_type") != ["client_credentials"]:
        return _wsgi_response(start_response, 400, ERROR[400])
    client = client_from(environ.get("HTTP_AUTHORIZATION", ""))
    if client is None:
        return _wsgi_response(start_response, 401, ERROR[401])
    with pool().connection() as conn:
        if not check(conn.execute(SELECT, [client[0]]).fetchone(), client[1]):
            return _wsgi_response(start_response, 401, ERROR[401])
        token, jti, expires = mint(client[0])
        conn.execute(INSERT, [jti, client[0], expires])
    return _wsgi_response(start_response, 200, body_for(token))


# --- ASGI --------------------------------------------------------------------------------------------

_apool: "AsyncConnectionPool | None" = None
_apool_lock = asyncio.Lock()


async def apool() -> "AsyncConnectionPool":
    global _apool
    if _apool is None:
        async with _apool_lock:
            if _apool is None:
                from psycopg_pool import AsyncConnectionPool

                p = AsyncConnectionPool(DATABASE_URL, min_size=1, max_size=8, open=False)
                await p.open()
                _apool = p
    return _apool


async def _asgi_response(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def asgi_application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/healthz":
        return await _asgi_response(send, 200, b"{}")
    if scope["path"] != "/token" or scope["method"] != "POST":
        return await _asgi_response(send, 404, ERROR[404])
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    form = parse_qs(b"".join(chunks).decode())
    if form.get("grant_type") != ["client_credentials"]:
        return await _asgi_response(send, 400, ERROR[400])
    headers = dict(scope["headers"])
    client = client_from(headers.get(b"authorization", b"").decode())
    if client is None:
        return await _asgi_response(send, 401, ERROR[401])
    async with (await apool()).connection() as conn:
        row = await (await conn.execute(SELECT, [client[0]])).fetchone()
        if not check(row, client[1]):
            return await _asgi_response(send, 401, ERROR[401])
        token, jti, expires = mint(client[0])
        await conn.execute(INSERT, [jti, client[0], expires])
    return await _asgi_response(send, 200, body_for(token))

"""A push service on loopback, as a browser vendor runs one (RFC 8030 §5), for tests.

It checks each request the way a real one does: the VAPID ``Authorization: vapid t=<JWT>, k=<key>``
header (RFC 8292 §2, §3: an ES256 JWT signed by ``k``, ``aud`` = this service's origin, ``exp``
within 24 hours, a ``sub`` contact), ``Content-Encoding: aes128gcm`` and a ``TTL``; then decrypts
the body with the subscriber's private key and auth secret (RFC 8291 §3.4, http_ece), as the
browser would, and keeps the plaintext. ``answer`` sets the status it replies with.
"""

import base64
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@dataclass
class BrowserKeys:
    """What a browser makes when it subscribes (RFC 8291 §3.1, §3.2): a P-256 key pair and an auth secret."""

    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    @property
    def p256dh(self) -> str:
        return b64url(
            self.private.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )

    def subscription(self, endpoint: str) -> dict[str, Any]:
        return {
            "endpoint": endpoint,
            "expirationTime": None,
            "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)},
        }


@dataclass
class Received:
    path: str
    claims: dict[str, Any]
    vapid_key: str
    headers: dict[str, str]
    payload: dict[str, Any]


class PushService:
    def __init__(self) -> None:
        self.subscribers: dict[str, BrowserKeys] = {}
        self.received: list[Received] = []
        self.problems: list[str] = []
        self.answers: dict[str, list[int]] = {}  # path -> statuses to answer, in turn (then 201)
        self.arrived = threading.Condition()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = service.handle(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "PushService":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def subscribe(self, name: str) -> tuple[str, BrowserKeys]:
        keys = BrowserKeys()
        path = f"/push/{name}"
        self.subscribers[path] = keys
        return self.origin + path, keys

    def answer(self, name: str, *statuses: int) -> None:
        self.answers[f"/push/{name}"] = list(statuses)

    def _problem(self, text: str) -> int:
        self.problems.append(text)
        return 400

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        headers = {k.lower(): v for k, v in headers.items()}
        keys = self.subscribers.get(path)
        if keys is None:
            return 404
        queued = self.answers.get(path)
        if queued:
            status = queued.pop(0)
            if status >= 300:
                return status
        # RFC 8292 §3: Authorization: vapid t=<JWT>, k=<uncompressed P-256 point, base64url>
        auth = headers.get("authorization", "")
        if not auth.startswith("vapid "):
            return self._problem(f"no VAPID authorization: {auth[:40]!r}")
        params = dict(part.strip().split("=", 1) for part in auth[6:].split(","))
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(params["k"]))
            claims = jwt.decode(
                params["t"],
                public,
                algorithms=["ES256"],
                audience=self.origin,
                options={"require": ["aud", "exp", "sub"]},
            )
        except (KeyError, ValueError, jwt.PyJWTError) as exc:
            return self._problem(f"VAPID JWT refused: {exc}")
        if claims["exp"] > time.time() + 24 * 3600:
            return self._problem("VAPID exp more than 24 hours ahead (RFC 8292 §2)")
        if not str(claims["sub"]).startswith(("mailto:", "https:", "http:")):
            return self._problem("VAPID sub is not a contact URI")
        if headers.get("content-encoding") != "aes128gcm" or "ttl" not in headers:
            return self._problem(f"bad headers {headers}")
        try:
            plain = http_ece.decrypt(
                body, private_key=keys.private, auth_secret=keys.auth, version="aes128gcm"
            )
        except Exception as exc:  # any failure to decrypt is the sender's fault
            return self._problem(f"cannot decrypt: {exc!r}")
        with self.arrived:
            self.received.append(Received(path, claims, params["k"], headers, json.loads(plain)))
            self.arrived.notify_all()
        return 201

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.received) < count and time.monotonic() < deadline:
                self.arrived.wait(0.2)
        return list(self.received)

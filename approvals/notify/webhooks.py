"""Standard Webhooks: signed outgoing webhooks for an organisation's prompts.

https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md

Each message carries ``webhook-id`` (the same on every retry of one message, so a receiver can
drop duplicates), ``webhook-timestamp`` (integer seconds since the epoch) and
``webhook-signature``: ``v1,`` + base64 of HMAC-SHA256 over ``{id}.{timestamp}.{body}``, keyed
with the base64-decoded part of the ``whsec_`` secret. The body is JSON ``{"type", "timestamp",
"data"}``; it tells of the prompt (headline, link) and can never decide it.
"""

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx

from consent.conf import countersign_settings

SECRET_PREFIX = "whsec_"


def webhook_secret_new() -> str:
    """A ``whsec_`` secret: 32 random bytes, base64 (the spec allows 24 to 64 bytes)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a Standard Webhooks secret starts with whsec_")
    return base64.b64decode(secret[len(SECRET_PREFIX) :])


def sign(*, secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def verify(*, secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """A receiver's check: one of the space-separated ``v1`` signatures matches, and the
    timestamp is within ``tolerance`` seconds (replay protection)."""
    try:
        msg_id, timestamp = headers["webhook-id"], int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret=secret, msg_id=msg_id, timestamp=timestamp, body=body)
    return any(
        hmac.compare_digest(expected, candidate)
        for candidate in headers.get("webhook-signature", "").split(" ")
        if candidate.startswith("v1,")
    )


@dataclass(frozen=True)
class WebhookOutcome:
    delivered: bool
    retry: bool
    error: str


def webhook_body(*, event_type: str, data: dict[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def webhook_send(*, url: str, secret: str, msg_id: str, body: bytes) -> WebhookOutcome:
    """POST one signed message. 2xx is delivered; 429 and 5xx and no answer are retried; any other
    answer is final (the spec's receivers answer 4xx for a message they will never take)."""
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret=secret, msg_id=msg_id, timestamp=timestamp, body=body),
    }
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            follow_redirects=False,
            timeout=countersign_settings.WEBHOOK_TIMEOUT_SECONDS,
        )
    except httpx.HTTPError as exc:
        return WebhookOutcome(False, True, type(exc).__name__)
    if 200 <= response.status_code < 300:
        return WebhookOutcome(True, False, "")
    status = response.status_code
    return WebhookOutcome(False, status == 429 or status >= 500, f"receiver answered HTTP {status}")

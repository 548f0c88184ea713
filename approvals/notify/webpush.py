"""Generic Event Delivery Using HTTP Push (RFC 8030), Message Encryption for Web Push (RFC 8291,
``aes128gcm`` of RFC 8188) and Voluntary Application Server Identification (VAPID, RFC 8292).

https://www.rfc-editor.org/rfc/rfc8030 · https://www.rfc-editor.org/rfc/rfc8291 ·
https://www.rfc-editor.org/rfc/rfc8292

The server's VAPID key pair lives in the database, like the signing keys (``consent.keys``), so every
process signs with the same key; it is generated on first use (or by ``manage.py vapid_key``). The
encryption and the JWT are pywebpush's (with py_vapid and http_ece); this module checks what a
browser hands us and says what a push service's answer means.
"""

import base64
import binascii
import ipaddress
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import IntegrityError, transaction

from consent.conf import countersign_settings
from consent.limits.jsonbounds import JSONTooDeep, JSONTooLarge, check

from .models import VapidKey

# RFC 8291 §3.1: the user agent's key is an uncompressed P-256 point (65 octets); §3.2: auth is 16 octets.
P256_POINT_OCTETS = 65
AUTH_SECRET_OCTETS = 16
MAX_ENDPOINT_LENGTH = 1024


def b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# --- the server's key (RFC 8292 §3.2 "k") ---------------------------------------------------------


def _generate() -> tuple[str, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    point = private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return pem, b64url_encode(point)


def vapid_key_create() -> VapidKey:
    """A new active key pair; the old one is retired. Subscriptions made with the old public key
    (``applicationServerKey``) are refused by their push services from then on and get removed."""
    pem, public = _generate()
    with transaction.atomic():
        VapidKey.objects.filter(active=True).update(active=False)
        return VapidKey.objects.create(private_pem=pem, public_key=public, active=True)


def vapid_key() -> VapidKey:
    """The active key pair, created on first use."""
    key = VapidKey.objects.filter(active=True).first()
    if key is not None:
        return key
    try:
        with transaction.atomic():
            pem, public = _generate()
            return VapidKey.objects.create(private_pem=pem, public_key=public, active=True)
    except IntegrityError:  # another process made it first
        return VapidKey.objects.get(active=True)


def vapid_contact() -> str:
    """RFC 8292 §2.1 ``sub``: a contact URI for the push service's operator."""
    if countersign_settings.PUSH_CONTACT:
        return str(countersign_settings.PUSH_CONTACT)
    issuer = str(countersign_settings.ISSUER)
    if issuer.startswith("https://"):
        return issuer
    # A development server (an http issuer) has no public contact; an address on its host stands in.
    return f"mailto:countersign@{urlparse(issuer).hostname or 'localhost'}"


# --- what a browser hands us (PushSubscription.toJSON()) ------------------------------------------


@dataclass(frozen=True)
class Subscription:
    endpoint: str
    p256dh: str
    auth: str


class SubscriptionRejected(ValueError):
    """Why a subscription is not one we will push to (the message is shown to the user)."""


def loopback_allowed() -> bool:
    return bool(countersign_settings.PUSH_ALLOW_LOOPBACK or settings.DEBUG)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: Any) -> str:
    """RFC 8030 §5: the push resource is an https URL. Loopback http only in development and tests."""
    if not isinstance(endpoint, str) or not endpoint or len(endpoint) > MAX_ENDPOINT_LENGTH:
        raise SubscriptionRejected("the endpoint must be a URL of at most 1024 characters")
    parsed = urlparse(endpoint)
    host = parsed.hostname or ""
    if parsed.username or parsed.password or parsed.fragment or not host:
        raise SubscriptionRejected("the endpoint must be a plain URL with a host")
    if parsed.scheme == "https":
        if _is_loopback(host) and not loopback_allowed():
            raise SubscriptionRejected("a loopback push endpoint is accepted only in development")
        return endpoint
    if parsed.scheme == "http" and _is_loopback(host) and loopback_allowed():
        return endpoint
    raise SubscriptionRejected("the endpoint must be an https URL")


def _key(value: Any, octets: int, what: str) -> str:
    if not isinstance(value, str) or len(value) > 100:
        raise SubscriptionRejected(f"keys.{what} must be a base64url string")
    try:
        raw = b64url_decode(value)
    except (binascii.Error, ValueError) as exc:
        raise SubscriptionRejected(f"keys.{what} is not base64url") from exc
    if len(raw) != octets:
        raise SubscriptionRejected(f"keys.{what} must be {octets} octets")
    return b64url_encode(raw)


def parse_subscription(body: bytes) -> Subscription:
    """The JSON a browser's ``PushSubscription.toJSON()`` makes, bounded and checked (RFC 8291 §3)."""
    try:  # size and nesting measured before json parses (and recurses into) anything
        check(
            body, max_bytes=countersign_settings.PUSH_SUBSCRIPTION_MAX_BYTES, depth=4, what="the subscription"
        )
    except (JSONTooLarge, JSONTooDeep) as exc:
        raise SubscriptionRejected(str(exc)) from exc
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SubscriptionRejected("the subscription is not JSON") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
        raise SubscriptionRejected("the subscription needs an endpoint and keys")
    keys = data["keys"]
    p256dh = _key(keys.get("p256dh"), P256_POINT_OCTETS, "p256dh")
    if b64url_decode(p256dh)[0] != 0x04:
        raise SubscriptionRejected("keys.p256dh must be an uncompressed P-256 point")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(p256dh))
    except ValueError as exc:
        raise SubscriptionRejected("keys.p256dh is not a point on P-256") from exc
    return Subscription(
        endpoint=check_endpoint(data.get("endpoint")),
        p256dh=p256dh,
        auth=_key(keys.get("auth"), AUTH_SECRET_OCTETS, "auth"),
    )


# --- sending (RFC 8030 §5, §6.2) -------------------------------------------------------------------


@dataclass(frozen=True)
class PushOutcome:
    delivered: bool
    gone: bool  # RFC 8030 §7.3: 404 or 410, the subscription no longer exists
    retry: bool  # 429, 5xx, or no answer: try again later
    error: str


def push_send(*, subscription: dict[str, Any], payload: dict[str, Any], ttl: int) -> PushOutcome:
    """Encrypt ``payload`` for the subscription (RFC 8291, aes128gcm) and POST it with a VAPID
    signature (RFC 8292 §2: a JWT ``aud`` = the push service's origin, ``exp`` within 24 h, ``sub``)."""
    import requests
    from py_vapid import Vapid
    from pywebpush import WebPushException, webpush

    signer = Vapid.from_pem(vapid_key().private_pem.encode())
    try:
        webpush(
            subscription_info=subscription,
            data=json.dumps(payload, separators=(",", ":")),
            vapid_private_key=signer,
            vapid_claims={"sub": vapid_contact()},
            content_encoding="aes128gcm",
            ttl=max(0, ttl),
            timeout=countersign_settings.PUSH_TIMEOUT_SECONDS,
            headers={"Urgency": "high"},
        )  # RFC 8030 §5.3: a person is waiting on it
    except WebPushException as exc:
        status = exc.response.status_code if exc.response is not None else 0
        return PushOutcome(
            False,
            status in (404, 410),
            status == 429 or status >= 500 or status == 0,
            f"push service answered HTTP {status}" if status else str(exc)[:200],
        )
    except requests.RequestException as exc:
        return PushOutcome(False, False, True, f"{type(exc).__name__}"[:200])
    return PushOutcome(True, False, False, "")

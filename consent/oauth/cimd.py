"""OAuth Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document).

https://datatracker.ietf.org/doc/draft-ietf-oauth-client-id-metadata-document/

A ``client_id`` that is an https URL with a path (§3) names a JSON document describing the
client (RFC 7591 §2 metadata). At the authorization endpoint Countersign fetches it (§4),
validates it (§4.1: its ``client_id`` equals the URL exactly; the request's ``redirect_uri`` is
one of its ``redirect_uris``; ``none`` or ``private_key_jwt`` with a ``jwks_uri``, whose keys
are fetched the same way, ``consent.oauth.client_metadata``),
and keeps it as a self-described agent (``consent.selfdescribed``) until the cache lapses.

Fetching a URL a client chose is SSRF exposure (§6.5, SECURITY.md "Fetching on a client's
behalf"), so:

- the host is resolved once and every address checked; private, loopback, link-local,
  multicast, reserved and unspecified addresses are refused, except loopback in development
  (an http loopback issuer), where ``http://127.0.0.1`` documents are accepted too;
- the connection goes to the checked address (no second lookup to rebind), with TLS verified
  against the URL's host name;
- no redirect is followed (§4: a 3xx is an error); one deadline bounds the whole fetch
  (``CIMD_TIMEOUT_SECONDS``), and at most ``CIMD_MAX_BYTES`` are read, then the fetch stops;
- the answer must be 200 ``application/json``, within the JSON depth bound;
- §4.3 caching: the document is kept for its ``Cache-Control: max-age``, clamped to
  ``[CIMD_CACHE_MIN_SECONDS, CIMD_CACHE_MAX_SECONDS]``; ``no-store``/``no-cache`` keep it the minimum.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import ssl
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from django.utils import timezone

from consent.limits.jsonbounds import JSONTooDeep, JSONTooLarge, check

from ..conf import countersign_settings
from ..errors import InvalidClient
from .client_metadata import InvalidClientMetadata, parse

if TYPE_CHECKING:
    from django.http import HttpRequest

    from ..models import Agent

MAX_CLIENT_ID = 100  # the registry's client_id column
JSON_TYPES = ("application/json", "application/jwk-set+json")
MAX_KEYS = 10


class MetadataDocumentRefused(InvalidClient):
    """The client_id URL does not lead to an acceptable metadata document (§4.1). Fatal at the
    authorization endpoint: the redirect URI is unverified, so the user sees an error page."""

    status_code = 400


def looks_like_document_url(client_id: str) -> bool:
    return client_id.startswith(("https://", "http://"))


def _development() -> bool:
    from ..selfdescribed import is_development

    return is_development()


def check_url(url: str) -> tuple[str, str, int]:
    """§3: https, a host, a path, no fragment, no user information, no dot segments. (scheme, host, port)."""
    if len(url) > MAX_CLIENT_ID:
        raise MetadataDocumentRefused(reason=f"client_id URL longer than {MAX_CLIENT_ID} characters")
    parts = urlsplit(url)
    development = _development()
    if parts.scheme != "https" and not (development and parts.scheme == "http"):
        raise MetadataDocumentRefused(reason="client_id URL must use https")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise MetadataDocumentRefused(reason="client_id URL needs a host and no user information")
    if parts.fragment or "#" in url or parts.path in ("", "/"):
        raise MetadataDocumentRefused(reason="client_id URL needs a path and no fragment")
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        raise MetadataDocumentRefused(reason="client_id URL has dot segments")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise MetadataDocumentRefused(reason="client_id URL has a bad port") from exc
    return parts.scheme, parts.hostname, port


def _address_allowed(address: str, development: bool) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return development
    return not (
        ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def resolve(host: str, port: int) -> str:
    """One address for ``host``, every address it resolves to checked (a name must not mix in a private one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MetadataDocumentRefused(
            reason=f"client_id host does not resolve ({type(exc).__name__})"
        ) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    development = _development()
    refused = [a for a in addresses if not _address_allowed(a, development)]
    if not addresses or refused:
        raise MetadataDocumentRefused(
            reason=f"client_id host resolves to a non-public address ({refused[:1]})"
        )
    return addresses[0]


_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.I)


def cache_until(cache_control: str, now: datetime) -> datetime:
    """§4.3: honour ``max-age`` within the configured floor and ceiling."""
    floor, ceiling = countersign_settings.CIMD_CACHE_MIN_SECONDS, countersign_settings.CIMD_CACHE_MAX_SECONDS
    seconds = floor
    lowered = cache_control.lower()
    if "no-store" not in lowered and "no-cache" not in lowered:
        match = _MAX_AGE.search(cache_control)
        if match:
            seconds = int(match.group(1))
    return now + timedelta(seconds=min(max(seconds, floor), ceiling))


def fetch(url: str) -> tuple[object, str]:
    """GET the document (checks above). Returns (parsed JSON, Cache-Control)."""
    scheme, host, port = check_url(url)
    address = resolve(host, port)
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    target = f"{scheme}://{literal}:{port}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    host_header = host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"
    limit, timeout = countersign_settings.CIMD_MAX_BYTES, float(countersign_settings.CIMD_TIMEOUT_SECONDS)
    deadline = time.monotonic() + timeout
    body = bytearray()
    try:
        bundle = countersign_settings.CIMD_CA_BUNDLE
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=bundle) if bundle else True
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=verify) as client,
            client.stream(
                "GET",
                target,
                headers={"Host": host_header, "Accept": "application/json"},
                extensions={"sni_hostname": host},
            ) as response,
        ):
            if 300 <= response.status_code < 400:
                raise MetadataDocumentRefused(reason="client_id URL redirects (redirects are not followed)")
            if response.status_code != 200:
                raise MetadataDocumentRefused(reason=f"client_id URL answered HTTP {response.status_code}")
            if response.headers.get("content-type", "").split(";")[0].strip().lower() not in JSON_TYPES:
                raise MetadataDocumentRefused(reason="metadata document is not application/json")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise MetadataDocumentRefused(reason=f"metadata document larger than {limit} bytes")
            for chunk in response.iter_raw():  # as the bytes arrive: the deadline is checked on each
                body += chunk
                if len(body) > limit:
                    raise MetadataDocumentRefused(reason=f"metadata document larger than {limit} bytes")
                if time.monotonic() > deadline:
                    raise MetadataDocumentRefused(reason="metadata document fetch took too long")
            cache_control = response.headers.get("cache-control", "")
    except httpx.TimeoutException as exc:
        raise MetadataDocumentRefused(reason="metadata document fetch took too long") from exc
    except httpx.HTTPError as exc:
        raise MetadataDocumentRefused(
            reason=f"metadata document fetch failed ({type(exc).__name__})"
        ) from exc
    try:
        check(bytes(body), max_bytes=limit, what="metadata document")
        document = json.loads(bytes(body))
    except (JSONTooDeep, JSONTooLarge, ValueError) as exc:
        raise MetadataDocumentRefused(reason="metadata document is not valid JSON within bounds") from exc
    return document, cache_control


def fetch_jwks(url: str) -> dict[str, Any]:
    """The keys a ``private_key_jwt`` client signs its assertions with (RFC 7591 §2 ``jwks_uri``),
    fetched under the same guards as the document."""
    raw, _ = fetch(url)
    keys = raw.get("keys") if isinstance(raw, dict) else None
    if (
        not isinstance(keys, list)
        or not keys
        or len(keys) > MAX_KEYS
        or not all(isinstance(k, dict) and isinstance(k.get("kty"), str) and "d" not in k for k in keys)
    ):
        raise MetadataDocumentRefused(reason=f"jwks_uri is not a JWK Set of 1 to {MAX_KEYS} public keys")
    return {"keys": keys}


def resolve_agent(client_id: str, *, redirect_uri: str, request: HttpRequest | None = None) -> Agent:
    """The self-described agent for ``client_id``, from cache or a fresh fetch; §4.1 checks first.

    Nothing is stored unless every check passes. Raises ``MetadataDocumentRefused``.
    """
    from oauth2_provider.models import redirect_to_uri_allowed

    from ..models import Agent
    from ..selfdescribed import agent_from_document

    if not countersign_settings.CLIENT_ID_METADATA_DOCUMENTS:
        raise MetadataDocumentRefused(reason="client ID metadata documents are not accepted here")
    now = timezone.now()
    known: Agent | None = Agent.objects.filter(client_id=client_id).first()
    if known is not None and known.registration != Agent.Registration.METADATA_DOCUMENT:
        return known  # an agent registered otherwise whose client_id happens to be a URL
    if known is not None and known.metadata_expires_at and known.metadata_expires_at > now:
        return known
    raw, cache_control = fetch(client_id)
    if not isinstance(raw, dict) or raw.get("client_id") != client_id:
        raise MetadataDocumentRefused(reason="the document's client_id is not its URL")
    try:
        metadata = parse(raw, secrets_allowed=False)
    except InvalidClientMetadata as exc:
        raise MetadataDocumentRefused(reason=f"{exc.error}: {exc.reason or exc.description}") from exc
    if redirect_uri and not redirect_to_uri_allowed(redirect_uri, metadata.redirect_uris):
        raise MetadataDocumentRefused(reason="redirect_uri is not among the document's redirect_uris")
    jwks = fetch_jwks(metadata.document["jwks_uri"]) if metadata.auth_method == "private_key_jwt" else None
    try:
        agent, _ = agent_from_document(
            client_id=client_id,
            metadata=metadata,
            jwks=jwks,
            expires_at=cache_until(cache_control, now),
            request=request,
        )
    except InvalidClientMetadata as exc:
        raise MetadataDocumentRefused(reason=f"{exc.error}: {exc.description}") from exc
    return agent

"""Client metadata of agents that describe themselves (RFC 7591 §2), checked before anything is stored.

https://www.rfc-editor.org/rfc/rfc7591#section-2

Shared by dynamic registration (RFC 7591 §3, ``consent.views.registration``) and Client ID
Metadata Documents (``consent.oauth.cimd``). What Countersign accepts:

- ``redirect_uris`` (§2, required for the authorization code grant): https URIs, or http on a
  loopback address for native clients (RFC 8252 §7.3: ``127.0.0.1``/``[::1]``, any port at
  request time), no fragment (RFC 6749 §3.1.2), at most ``MAX_REDIRECT_URIS``;
- ``grant_types`` within ``authorization_code`` and ``refresh_token``, ``response_types`` ``code``;
- ``token_endpoint_auth_method``: ``none`` (a public client; PKCE binds its codes); for a
  registration, ``client_secret_basic``/``client_secret_post`` (the secret is ours, RFC 7591
  §3.2.1); for a metadata document, ``private_key_jwt`` with an https ``jwks_uri`` (RFC 7523,
  fetched like the document). Anything else is ``invalid_client_metadata`` (§3.2.2);
- ``client_name``, ``client_uri``, ``logo_uri``, ``scope``, ``software_id``, ``software_version``
  are kept as strings, bounded; the consent screen labels them as the agent's own claims.
"""

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import OAuthError

MAX_REDIRECT_URIS = 10
MAX_URI = 300
MAX_TEXT = 200
LOOPBACK_HOSTS = {"127.0.0.1", "::1"}
SECRET_METHODS = ("client_secret_basic", "client_secret_post")
GRANT_TYPES = {"authorization_code", "refresh_token"}
TEXT_FIELDS = ("client_name", "client_uri", "logo_uri", "scope", "software_id", "software_version")


class InvalidClientMetadata(OAuthError):
    """RFC 7591 §3.2.2: "The value of one of the client metadata fields is invalid"."""

    error = "invalid_client_metadata"


class InvalidRedirectUri(InvalidClientMetadata):
    """RFC 7591 §3.2.2: "The value of one or more redirection URIs is invalid"."""

    error = "invalid_redirect_uri"


@dataclass(frozen=True)
class ClientMetadata:
    redirect_uris: list[str]
    auth_method: str
    name: str
    scope: list[str]
    document: dict[str, Any]  # the metadata as kept: only the fields named above

    @property
    def is_public(self) -> bool:
        return self.auth_method == "none"


def is_loopback_host(host: str | None) -> bool:
    """RFC 8252 §7.3 loopback literals (and ``localhost``, which §8.3 discourages but resolves locally)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redirect_uri(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_URI:
        raise InvalidRedirectUri("Each redirect URI must be a string of at most 300 characters.")
    parts = urlsplit(value)
    if parts.fragment or "#" in value or parts.username is not None or not parts.hostname:
        raise InvalidRedirectUri(
            "A redirect URI must be absolute, without a fragment or user information.",
            reason=f"bad redirect URI {value[:100]!r}",
        )
    if parts.scheme == "https":
        return value
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return value  # RFC 8252 §7.3: any port is accepted at request time
    raise InvalidRedirectUri(
        "Redirect URIs must use https, or http on 127.0.0.1 or [::1] (RFC 8252 §7.3).",
        reason=f"redirect URI scheme or host not allowed: {value[:100]!r}",
    )


def parse(raw: Any, *, secrets_allowed: bool) -> ClientMetadata:
    """Check a client metadata object (§2). ``secrets_allowed``: a registration may ask for a client
    secret; a metadata document may not (it is public, and there is no one to give the secret to)."""
    if not isinstance(raw, dict):
        raise InvalidClientMetadata("Client metadata must be a JSON object.")
    uris = raw.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise InvalidRedirectUri("redirect_uris (a non-empty list) is required.")
    if len(uris) > MAX_REDIRECT_URIS:
        raise InvalidRedirectUri(f"At most {MAX_REDIRECT_URIS} redirect URIs.")
    redirect_uris = list(dict.fromkeys(_redirect_uri(u) for u in uris))
    method = raw.get("token_endpoint_auth_method", "client_secret_basic" if secrets_allowed else "none")
    allowed = ("none", *SECRET_METHODS) if secrets_allowed else ("none", "private_key_jwt")
    if method not in allowed:
        raise InvalidClientMetadata(
            f"token_endpoint_auth_method must be one of {', '.join(allowed)}.",
            reason=f"unsupported token_endpoint_auth_method {str(method)[:40]!r}",
        )
    jwks_uri = raw.get("jwks_uri")
    if method == "private_key_jwt" and not (
        isinstance(jwks_uri, str)
        and jwks_uri.startswith(("https://", "http://"))
        and len(jwks_uri) <= MAX_URI
    ):
        raise InvalidClientMetadata(
            "private_key_jwt needs a jwks_uri (an https URL; http on loopback in development).",
            reason="private_key_jwt without an https jwks_uri",
        )
    grant_types = raw.get("grant_types", ["authorization_code"])
    if (
        not isinstance(grant_types, list)
        or not set(grant_types) <= GRANT_TYPES
        or ("authorization_code" not in grant_types)
    ):
        raise InvalidClientMetadata(
            "grant_types must include authorization_code and may add refresh_token only."
        )
    if raw.get("response_types", ["code"]) != ["code"]:
        raise InvalidClientMetadata('response_types must be ["code"].')
    kept: dict[str, Any] = {
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": method,
        "grant_types": grant_types,
        "response_types": ["code"],
    }
    if method == "private_key_jwt":
        kept["jwks_uri"] = jwks_uri
    for name in TEXT_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > (MAX_URI if name.endswith("uri") else MAX_TEXT):
            raise InvalidClientMetadata(f"{name} must be a string of bounded length.")
        kept[name] = value
    scope = kept.get("scope", "").split()
    return ClientMetadata(
        redirect_uris=redirect_uris,
        auth_method=method,
        name=kept.get("client_name", "").strip(),
        scope=scope,
        document=kept,
    )

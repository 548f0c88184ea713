"""Refused websocket handshakes: one audit row per reason and source a minute, the rest counted.

A flood of refused handshakes (a page on another origin, a script without a session) must not
grow the audit table one row per attempt: the first refusal of a (reason, source) pair in
``WINDOW`` seconds is audited, every refusal is counted (``countersign_limit_refusals``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator
from django.conf import settings

from . import store

if TYPE_CHECKING:
    from asgiref.typing import ASGIReceiveCallable, ASGISendCallable
    from channels.consumer import _ChannelScope
    from channels.utils import _ChannelApplication

WINDOW = 60


def _source(scope: Mapping[str, Any]) -> str:
    client = scope.get("client") or ("",)
    return str(client[0] or "")[:64]


def _header(scope: Mapping[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin1"))[:200]
    return ""


def audit_handshake_refusal(scope: Mapping[str, Any], *, reason: str) -> None:
    """Record a refused handshake (sync: call through ``database_sync_to_async``)."""
    source = _source(scope)
    if not store.first_refusal(f"ws:{reason}:{source}", field=f"ws_handshake:{reason}", window=WINDOW):
        return
    from django.db import DatabaseError

    from audit.services import audit_refusal

    try:
        audit_refusal(
            event="websocket.refused",
            error=reason,
            actor="",
            request=SimpleNamespace(META={"REMOTE_ADDR": source}),
            detail={"path": str(scope.get("path", ""))[:200], "origin": _header(scope, b"origin")},
        )
    except DatabaseError:  # the handshake is refused all the same
        pass


class AuditedOriginValidator(OriginValidator):
    """Channels' Origin check (``AllowedHostsOriginValidator``: the ALLOWED_HOSTS list), audited when
    it refuses."""

    async def __call__(
        self, scope: _ChannelScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Any:
        if scope["type"] == "websocket":
            origin = _header(scope, b"origin")
            if not self.valid_origin(urlparse(origin) if origin else None):
                await database_sync_to_async(audit_handshake_refusal)(scope, reason="bad_origin")
        return await super().__call__(scope, receive, send)


def origin_validated(application: _ChannelApplication) -> OriginValidator:
    """``AllowedHostsOriginValidator``, audited: the allowed origins are ALLOWED_HOSTS (any
    scheme and port), or anything in DEBUG with no ALLOWED_HOSTS."""
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
    return AuditedOriginValidator(application, allowed_hosts)

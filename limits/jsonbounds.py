"""Size and depth of JSON input, checked on the raw text before anything parses it.

Python's ``json`` parser recurses once per nesting level and gives up with ``RecursionError``
(not ``ValueError``) near a thousand: a few kilobytes of ``[[[[`` would reach it. So every JSON
text a client sends is measured first, without recursion: a text with fewer brackets than the
depth limit cannot be too deep (two ``bytes.count`` calls, the usual case); otherwise one
linear scan that skips string literals tracks the depth.

Used for ``authorization_details`` (RFC 9396 §2), the header and claims of every JWT a client
presents (RFC 7519 §7.2: both are JSON objects), and websocket messages.
"""

from __future__ import annotations

import base64
import binascii
import re

from consent.conf import countersign_settings

_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JSONTooLarge(ValueError):
    pass


class JSONTooDeep(ValueError):
    pass


def max_depth() -> int:
    return countersign_settings.JSON_MAX_DEPTH


def depth_within(data: bytes, limit: int) -> bool:
    """True if no array or object in ``data`` nests deeper than ``limit`` (iterative)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return True
    depth = 0
    for match in _TOKENS.finditer(data):
        ch = match.group()
        if ch in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return False
        elif ch in (b"]", b"}"):
            depth -= 1
    return True


def check(raw: str | bytes, *, max_bytes: int, depth: int | None = None, what: str = "JSON") -> None:
    """Raise ``JSONTooLarge`` / ``JSONTooDeep`` (both ``ValueError``) before ``raw`` is parsed."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise JSONTooLarge(f"{what} is larger than {max_bytes} bytes")
    limit = max_depth() if depth is None else depth
    if not depth_within(data, limit):
        raise JSONTooDeep(f"{what} nests deeper than {limit} levels")


def check_jwt(token: str, *, depth: int | None = None) -> None:
    """Bound the JSON of a compact JWS's header and payload (RFC 7515 §7.1) before a JWT library
    parses them. Segments that are not base64url are left for the library to refuse."""
    limit = max_depth() if depth is None else depth
    for segment in token.split(".", 2)[:2]:
        try:
            data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        except (binascii.Error, ValueError):
            continue
        if not depth_within(data, limit):
            raise JSONTooDeep(f"the token's JSON nests deeper than {limit} levels")

"""Size and depth of JSON input, checked on the raw text before anything parses it.

Python's ``json`` parser recurses once per nesting level and gives up with ``RecursionError``
(not ``ValueError``) near a thousand: a few kilobytes of ``[[[[`` would reach it. So every JSON
text a client sends is measured first, without recursion: a text with fewer brackets than the
depth limit cannot be too deep (two ``bytes.count`` calls, the usual case); otherwise one
linear scan that skips string literals tracks the depth.

The scan itself is ``countersign.jsonbounds`` (shared with the resource-server verifier).
Used for ``authorization_details`` (RFC 9396 §2), the header and claims of every JWT a client
presents (RFC 7519 §7.2: both are JSON objects), and websocket messages.
"""

from __future__ import annotations

from consent.conf import countersign_settings
from countersign.jsonbounds import depth_within, jws_within


class JSONTooLarge(ValueError):
    pass


class JSONTooDeep(ValueError):
    pass


def max_depth() -> int:
    depth: int = countersign_settings.JSON_MAX_DEPTH
    return depth


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
    parses them (``JWT_MAX_DEPTH``: claims carry authorization_details and act chains). Segments
    that are not base64url are left for the library to refuse."""
    limit = countersign_settings.JWT_MAX_DEPTH if depth is None else depth
    if not jws_within(token, limit):
        raise JSONTooDeep(f"the token's JSON nests deeper than {limit} levels")

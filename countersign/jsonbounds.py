"""JSON nesting depth, measured on the raw text before it is parsed (no recursion).

Python's ``json`` parser recurses once per nesting level and fails with ``RecursionError``
near a thousand levels: a few kilobytes of ``[[[[`` in a token's header or claims would turn
a refusal into a crash. A text with fewer brackets than the limit cannot be too deep (two
``bytes.count`` calls, the usual case); otherwise one linear scan that skips string literals
tracks the depth.
"""

from __future__ import annotations

import base64
import binascii
import re

# Our tokens nest authorization_details (itself at most 16 deep) and act chains inside their claims.
MAX_DEPTH = 32
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def depth_within(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """True if no array or object in ``data`` nests deeper than ``limit``."""
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


def jws_within(token: str, limit: int = MAX_DEPTH) -> bool:
    """True if the JSON header and payload of a compact JWS (RFC 7515 §7.1) nest at most ``limit``
    deep. Segments that are not base64url count as within: the JWT library refuses them."""
    for segment in token.split(".", 2)[:2]:
        try:
            data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        except (binascii.Error, ValueError):
            continue
        if not depth_within(data, limit):
            return False
    return True

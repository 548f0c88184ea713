"""RFC 8785 (JCS) canonical JSON, fast for the plain shapes audit rows have.

For objects whose keys are all in the Basic Multilingual Plane (so code-point order is
UTF-16 order, RFC 8785 §3.2.3), without floats and with integers inside I-JSON's exact range
(RFC 7493 §2.2), ``json.dumps(sort_keys, compact, ensure_ascii=False)`` writes exactly the JCS
bytes: the same escapes (§3.2.2.2: ``\\b \\t \\n \\f \\r``, other controls as lowercase
``\\u00xx``, nothing else escaped) and the same integer form, at a fraction of the cost of
the general serializer (the sealer hashes every event twice). Anything else goes to
``rfc8785.dumps``, which also refuses what JCS cannot represent.
"""

import json
from typing import Any

import rfc8785

_SAFE = 2**53 - 1


def _bmp(key: str) -> bool:
    return key.isascii() or all(ord(c) <= 0xFFFF for c in key)


def _plain(value: Any, depth: int = 0) -> bool:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_SAFE <= value <= _SAFE)
    if depth > 64:
        return False
    if kind is dict:
        return all(type(k) is str and _bmp(k) and _plain(v, depth + 1) for k, v in value.items())
    if kind is list:
        return all(_plain(v, depth + 1) for v in value)
    return False


def dumps(value: Any) -> bytes:
    if _plain(value):
        try:
            return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(
                "utf-8"
            )
        except UnicodeEncodeError:  # a lone surrogate: let the general serializer decide
            pass
    return rfc8785.dumps(value)

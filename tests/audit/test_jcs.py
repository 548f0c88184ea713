"""The sealer's fast canonical JSON writes exactly what RFC 8785 (``rfc8785.dumps``, which the
client package uses to recompute leaves) writes, and falls back where it might not."""

from typing import Any

import pytest
import rfc8785

from audit.jcs import dumps

CASES = [
    {},
    [],
    {"a": 1, "b": [True, False, None], "c": {"z": "", "y": "x"}},
    {"control": "".join(chr(c) for c in range(0x20)) + '"\\/\x7f'},
    {"unicode": "é ünïcode ∑ 中文 \u2028\u2029 😀 \ufeff"},
    {"ключ": 1, "é": 2, "e": 3, "\ue000": 4, "Z": 5, "a": 6, "": 7},
    {"emoji-key-😀": 1, "\uffff": 2},  # above the BMP: the general serializer orders by UTF-16
    {"big": 2**53 - 1, "neg": -(2**53 - 1), "zero": 0},
    {"float": 1.5},
    {"float": 1e21},
    {"float": -0.0},
    [0.1, 100.0],
    {"nested": [[[[{"k": ["v", 1, None]}]]]]},
    {"approval_id": "5f0c", "amount": "4250.00", "scope": "ledger:write", "aud": ["https://x"]},
]


@pytest.mark.parametrize("value", CASES)
def test_fast_canonical_json_is_rfc8785(value: Any) -> None:  # Any: JSON of every shape
    assert dumps(value) == rfc8785.dumps(value)


def test_what_jcs_cannot_represent_is_still_refused() -> None:
    with pytest.raises(rfc8785.IntegerDomainError):
        dumps({"too_big": 2**53})

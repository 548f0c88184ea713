"""OAuth 2.0 Rich Authorization Requests (RFC 9396): parsing, hashing, rendering.

https://www.rfc-editor.org/rfc/rfc9396

``authorization_details`` is a JSON array of objects, each with a ``type``
(§2). The action hash binds a token to exactly one action: base64url SHA-256 of
the RFC 8785 (JCS) canonical form of the whole array, so any change to an
amount, a payee or the order of entries changes the hash.
"""

import base64
import hashlib
import json
from decimal import Decimal
from typing import Any, NoReturn

from audit import jcs
from consent.limits import jsonbounds

MAX_DETAILS_BYTES = 8192
MAX_ENTRIES = 10


class InvalidDetails(ValueError):
    """RFC 9396 §5: ``invalid_authorization_details``."""


def parse(raw: str, *, allowed_types: list[str]) -> list[dict[str, Any]]:
    if not raw:
        raise InvalidDetails("authorization_details is required for a step-up scope")
    try:
        # Measured before parsing: the parser recurses once per level (consent.limits.jsonbounds).
        jsonbounds.check(raw, max_bytes=MAX_DETAILS_BYTES, what="authorization_details")
    except ValueError as exc:
        raise InvalidDetails(str(exc)) from exc
    try:
        details = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidDetails("authorization_details is not valid JSON") from exc
    if not isinstance(details, list) or not details or len(details) > MAX_ENTRIES:
        raise InvalidDetails(f"authorization_details must be a JSON array of 1 to {MAX_ENTRIES} objects")
    for entry in details:
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise InvalidDetails("each authorization_details entry must be an object with a string type")
        if entry["type"] not in allowed_types:
            raise InvalidDetails(
                f"authorization_details type {entry['type']!r} is not accepted for this scope"
            )
        if _has_fraction(entry):
            raise InvalidDetails('write decimal amounts as strings (e.g. "4250.00"), not JSON numbers')
    return details


def _has_fraction(value: Any) -> bool:
    """JSON numbers with a fraction have no single canonical form across languages: refuse them.

    Walks with a stack of its own, not by recursion (the depth is bounded already, but nothing
    here recurses on input depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Decimal):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(name)


def action_hash(details: list[dict[str, Any]]) -> str:
    """base64url(SHA-256(JCS(details))), RFC 8785; ``audit.jcs`` writes the same bytes as
    ``rfc8785.dumps`` for plain JSON at a fraction of its cost (a redemption computes it for the
    token it verifies: the general serializer was a tenth of a redemption's CPU, cProfile)."""
    digest = hashlib.sha256(jcs.dumps(details)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _money(entry: dict[str, Any]) -> str:
    amount, currency = entry.get("amount"), entry.get("currency", "")
    return f"{amount} {currency}".strip() if amount is not None else ""


MCP_TOOL_CALL = "mcp_tool_call"


def _tool_call(entry: dict[str, Any]) -> str:
    """An MCP tool call a resource server is about to make: ``{"type": "mcp_tool_call", "server": ...,
    "tool": ..., "arguments": {...}}``; money, payee and reference read from the arguments."""
    arguments = entry.get("arguments")
    args: dict[str, Any] = arguments if isinstance(arguments, dict) else {}
    text = f"Run {entry.get('tool') or 'a tool'}"
    money = _money(args)
    if money:
        text += f": {money}"
    if args.get("vendor"):
        text += f" to {args['vendor']}"
    if args.get("purchase_order"):
        text += f" ({args['purchase_order']})"
    return text


def headline(details: list[dict[str, Any]], *, system: str) -> str:
    """The prompt's headline, rendered by the server (never the agent's words)."""
    parts = []
    for entry in details:
        if entry["type"] == "ledger_entry":
            what = ", ".join(a for a in entry.get("actions", []) if isinstance(a, str)) or "write"
            money = _money(entry)
            payee = entry.get("vendor") or entry.get("payee") or entry.get("creditor_name")
            ref = entry.get("purchase_order")
            text = f"{what.capitalize()} {money}" if money else what.capitalize()
            if payee:
                text += f" to {payee}"
            if ref:
                text += f" ({ref})"
            parts.append(text)
        elif entry["type"] == MCP_TOOL_CALL:
            parts.append(_tool_call(entry))
        else:
            money = _money(entry)
            parts.append(f"{entry['type']}" + (f": {money}" if money else ""))
    return f"{'; '.join(parts)} — {system}"[:300]

"""The five downstream systems of the reference scenario, as small resource servers.

One process, one uvicorn server listening on five loopback ports (one socket per system);
a tiny ASGI router sends each connection to the system whose port it arrived on:

=======================  ======  ==================  =================================
system                   port    scope               endpoints
=======================  ======  ==================  =================================
vendor catalog           8101    ``catalog:read``    GET /vendors, /vendors/{id}, /items?q=
budget                   8102    ``budget:read``     GET /lines, /lines/{code}, /lines/{code}/check?amount=
procurement drafting     8103    ``po:draft``        POST /drafts, GET /drafts, /drafts/{po}
approval routing         8104    ``approval:route``  POST /routes, GET /routes
financial ledger         8105    ``ledger:write``    POST /entries (action token), GET /entries
=======================  ======  ==================  =================================

(The ports are those of the audiences in the credentials file.) Every system has its own
resource-server credentials and its own :class:`countersign.TokenVerifier`, so each one checks
both principals itself: the user (``sub``) through the token, the agent (``act.sub``) against
the live agent registry, and the DPoP proof when the token is bound. The first four are
protected by :class:`countersign.asgi.CountersignMiddleware` with their scope. The ledger
accepts a write only with a one-shot action token for ``ledger:write`` whose
``authorization_details`` are exactly the entry it is about to write: ``verify_action``
recomputes the action hash from the request body and redeems the token, once, at the
server's redemption endpoint; only then is the entry appended to ``ledger.jsonl``.

``GET /health`` on every system and ``GET /entries`` on the ledger need no token: they are
the operator's own read-outs, served on loopback only (the demo never binds elsewhere).

Drafts and ledger entries persist in ``--data-dir`` (default ``var/demo``): ``drafts.json``
and ``ledger.jsonl``. Catalog, budget and routing decisions live in memory.

Run::

    python -m examples.procurement.resource_servers --config var/demo/credentials.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qs

import httpx
import uvicorn

from countersign import CountersignError, TokenVerifier, VerifiedToken, parse_authorization
from countersign.asgi import CountersignMiddleware
from countersign.verifier import refusal

from . import config as demo_config

FISCAL_YEAR = 2026
CENTS = Decimal("0.01")
PUBLIC_PATHS = ("/health",)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def money(value: Decimal) -> str:
    return str(value.quantize(CENTS, rounding=ROUND_HALF_UP))


def parse_money(value: Any, what: str) -> Decimal:
    if not isinstance(value, str) or not re.fullmatch(r"\d{1,12}(\.\d{1,2})?", value):
        raise HTTPError(400, "invalid_request", f'{what} must be a decimal string such as "4250.00"')
    return Decimal(value)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- a very small HTTP layer ---------------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int, error: str, description: str = "") -> None:
        super().__init__(description or error)
        self.status, self.error, self.description = status, error, description


@dataclass
class Request:
    scope: Scope
    body: bytes
    match: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        values = [v.decode("latin-1") for k, v in self.scope.get("headers", []) if k.lower() == wanted]
        return ",".join(values) if values else None

    def query(self, name: str, default: str = "") -> str:
        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(name)
        return values[0] if values else default

    def json(self) -> dict[str, Any]:
        if not self.body:
            raise HTTPError(400, "invalid_request", "a JSON object body is required")
        try:
            # Fractional JSON numbers have no single canonical form (RFC 8785): amounts are strings.
            data = json.loads(self.body, parse_float=Decimal)
        except ValueError as exc:
            raise HTTPError(400, "invalid_request", "the body is not JSON") from exc
        if not isinstance(data, dict):
            raise HTTPError(400, "invalid_request", "the body must be a JSON object")
        return data

    @property
    def who(self) -> VerifiedToken | None:
        return self.scope.get("countersign")


Handler = Callable[[Request], Awaitable[tuple[int, Any]]]


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body, indent=2).encode() + b"\n"
    merged = {
        "content-type": "application/json",
        "content-length": str(len(payload)),
        "cache-control": "no-store",
    }
    merged |= {k.lower(): v for k, v in (headers or {}).items()}
    raw = [(k.encode(), v.encode("latin-1", "replace")) for k, v in merged.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def read_body(receive: Receive, limit: int = 64 * 1024) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, "invalid_request", "body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def checked_by(who: VerifiedToken | None) -> dict[str, Any] | None:
    """What the system verified, echoed to the caller: both principals of dual authentication."""
    if who is None:
        return None
    return {
        "user": who.subject,
        "agent": who.actor,
        "scopes": sorted(who.scopes),
        "grant_id": who.grant_id,
        "dpop_bound": who.dpop_jkt is not None,
    }


class System:
    """One downstream system: a name, a route table, and the ASGI callable serving it."""

    def __init__(self, key: str, title: str) -> None:
        self.key, self.title = key, title
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.route("GET", "/health", self.health)

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile("^" + pattern + "$"), handler))

    async def health(self, request: Request) -> tuple[int, Any]:
        return 200, {"system": self.key, "title": self.title, "status": "ok"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            body = await read_body(receive)
            allowed: list[str] = []
            for method, pattern, handler in self.routes:
                m = pattern.match(scope["path"])
                if m is None:
                    continue
                if method != scope["method"]:
                    allowed.append(method)
                    continue
                status, result = await handler(Request(scope, body, m.groupdict()))
                await send_json(send, status, result)
                return
            if allowed:
                raise HTTPError(405, "method_not_allowed", f"use {', '.join(allowed)}")
            raise HTTPError(404, "not_found", f"{self.title} has no {scope['path']}")
        except HTTPError as exc:
            await send_json(send, exc.status, {"error": exc.error, "error_description": exc.description})
        except CountersignError as exc:
            status, headers, payload = refusal(exc)
            await send_json(send, status, payload, headers)


# --- 1. vendor catalog ---------------------------------------------------------------------------


class Vendor(TypedDict):
    id: str
    name: str
    city: str
    rating: float
    lead_time_days: int
    payment_terms: str
    registered_supplier: bool


class Item(TypedDict):
    sku: str
    vendor_id: str
    name: str
    category: str
    unit_price: str
    in_stock: int


VENDORS: list[Vendor] = [
    {
        "id": "V-1001",
        "name": "Acme Office Supply",
        "city": "Springfield",
        "rating": 4.6,
        "lead_time_days": 5,
        "payment_terms": "net 30",
        "registered_supplier": True,
    },
    {
        "id": "V-1002",
        "name": "Globex Workplace Solutions",
        "city": "Cypress Creek",
        "rating": 4.2,
        "lead_time_days": 9,
        "payment_terms": "net 45",
        "registered_supplier": True,
    },
    {
        "id": "V-1003",
        "name": "Initech Furnishings",
        "city": "Austin",
        "rating": 3.9,
        "lead_time_days": 14,
        "payment_terms": "net 30",
        "registered_supplier": True,
    },
]

ITEMS: list[Item] = [
    {
        "sku": "ACM-SDC-32",
        "vendor_id": "V-1001",
        "name": "Standing desk converter, 32 in",
        "category": "furniture",
        "unit_price": "170.00",
        "in_stock": 140,
    },
    {
        "sku": "GLX-SDC-32",
        "vendor_id": "V-1002",
        "name": "Standing desk converter, 32 in, black",
        "category": "furniture",
        "unit_price": "189.50",
        "in_stock": 60,
    },
    {
        "sku": "INI-SDR-32",
        "vendor_id": "V-1003",
        "name": "Standing desk converter (riser), 32 in",
        "category": "furniture",
        "unit_price": "164.00",
        "in_stock": 12,
    },
    {
        "sku": "ACM-CHR-ERG",
        "vendor_id": "V-1001",
        "name": "Ergonomic task chair, mesh back",
        "category": "furniture",
        "unit_price": "239.00",
        "in_stock": 48,
    },
    {
        "sku": "GLX-ARM-DUAL",
        "vendor_id": "V-1002",
        "name": "Dual monitor arm, clamp mount",
        "category": "furniture",
        "unit_price": "89.90",
        "in_stock": 75,
    },
    {
        "sku": "ACM-PPR-A4",
        "vendor_id": "V-1001",
        "name": "Copy paper, A4, 80 g, box of 5 reams",
        "category": "supplies",
        "unit_price": "24.75",
        "in_stock": 900,
    },
    {
        "sku": "INI-TNR-58A",
        "vendor_id": "V-1003",
        "name": "Toner cartridge, black (58A compatible)",
        "category": "supplies",
        "unit_price": "61.20",
        "in_stock": 210,
    },
]


def catalog_system() -> System:
    system = System("catalog", "Vendor catalog")
    vendors = {v["id"]: v for v in VENDORS}

    def offer(item: Item) -> dict[str, Any]:
        vendor = vendors[item["vendor_id"]]
        return {
            **item,
            "currency": "USD",
            "vendor": vendor["name"],
            "lead_time_days": vendor["lead_time_days"],
        }

    async def list_vendors(request: Request) -> tuple[int, Any]:
        return 200, {"vendors": VENDORS, "checked": checked_by(request.who)}

    async def get_vendor(request: Request) -> tuple[int, Any]:
        vendor = vendors.get(request.match["id"])
        if vendor is None:
            raise HTTPError(404, "not_found", "no such vendor")
        items = [offer(i) for i in ITEMS if i["vendor_id"] == vendor["id"]]
        return 200, {"vendor": vendor, "items": items, "checked": checked_by(request.who)}

    async def search(request: Request) -> tuple[int, Any]:
        words = request.query("q").lower().split()
        category = request.query("category").lower()
        try:
            min_stock = int(request.query("min_stock", "0"))
        except ValueError as exc:
            raise HTTPError(400, "invalid_request", "min_stock must be an integer") from exc
        found = [
            offer(i)
            for i in ITEMS
            if all(w in f"{i['name']} {i['category']}".lower() for w in words)
            and (not category or i["category"] == category)
            and i["in_stock"] >= min_stock
        ]
        found.sort(key=lambda o: Decimal(o["unit_price"]))
        return 200, {"query": request.query("q"), "results": found, "checked": checked_by(request.who)}

    system.route("GET", "/vendors", list_vendors)
    system.route("GET", r"/vendors/(?P<id>[\w-]+)", get_vendor)
    system.route("GET", "/items", search)
    return system


# --- 2. budget -----------------------------------------------------------------------------------

BUDGET_LINES = [
    {
        "code": f"OPS-FURN-{FISCAL_YEAR}",
        "name": "Office furniture and equipment",
        "category": "furniture",
        "allocated": "60000.00",
        "committed": "31200.00",
        "spent": "12350.00",
    },
    {
        "code": f"OPS-SUPP-{FISCAL_YEAR}",
        "name": "Office supplies",
        "category": "supplies",
        "allocated": "18000.00",
        "committed": "4100.00",
        "spent": "9020.00",
    },
    {
        "code": f"IT-HW-{FISCAL_YEAR}",
        "name": "IT hardware",
        "category": "it",
        "allocated": "120000.00",
        "committed": "88400.00",
        "spent": "27650.00",
    },
]


def budget_system() -> System:
    system = System("budget", "Budget")
    lines = {line["code"]: line for line in BUDGET_LINES}

    def view(line: dict[str, Any]) -> dict[str, Any]:
        remaining = Decimal(line["allocated"]) - Decimal(line["committed"]) - Decimal(line["spent"])
        return {**line, "fiscal_year": FISCAL_YEAR, "currency": "USD", "remaining": money(remaining)}

    def line_or_404(code: str) -> dict[str, Any]:
        line = lines.get(code)
        if line is None:
            raise HTTPError(404, "not_found", f"no budget line {code}")
        return view(line)

    async def list_lines(request: Request) -> tuple[int, Any]:
        category = request.query("category").lower()
        found = [view(line) for line in BUDGET_LINES if not category or line["category"] == category]
        return 200, {"lines": found, "checked": checked_by(request.who)}

    async def get_line(request: Request) -> tuple[int, Any]:
        return 200, {"line": line_or_404(request.match["code"]), "checked": checked_by(request.who)}

    async def check(request: Request) -> tuple[int, Any]:
        line = line_or_404(request.match["code"])
        amount = parse_money(request.query("amount"), "amount")
        remaining = Decimal(line["remaining"])
        return 200, {
            "line": line["code"],
            "amount": money(amount),
            "currency": "USD",
            "remaining": line["remaining"],
            "sufficient": amount <= remaining,
            "remaining_after": money(remaining - amount),
            "checked": checked_by(request.who),
        }

    system.route("GET", "/lines", list_lines)
    system.route("GET", r"/lines/(?P<code>[\w-]+)", get_line)
    system.route("GET", r"/lines/(?P<code>[\w-]+)/check", check)
    return system


# --- 3. procurement drafting ---------------------------------------------------------------------


class DraftStore:
    """Draft purchase orders in ``drafts.json``; PO numbers continue across restarts."""

    FIRST_NUMBER = 142

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        if path.exists():
            self.data = json.loads(path.read_text())
        else:
            self.data = {"next_number": self.FIRST_NUMBER, "drafts": {}}

    def add(self, draft: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            number = self.data["next_number"]
            self.data["next_number"] = number + 1
            draft = {"purchase_order": f"PO-{FISCAL_YEAR}-{number:04d}", **draft}
            self.data["drafts"][draft["purchase_order"]] = draft
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2))
            os.replace(tmp, self.path)
            return draft

    def get(self, po: str) -> dict[str, Any] | None:
        with self.lock:
            draft: dict[str, Any] | None = self.data["drafts"].get(po)
            return draft

    def all(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.data["drafts"].values())


def drafting_system(store: DraftStore) -> System:
    system = System("drafting", "Procurement drafting")
    # Looked up by whatever the request's JSON holds.
    vendors: dict[object, Vendor] = {v["id"]: v for v in VENDORS}
    items: dict[object, Item] = {i["sku"]: i for i in ITEMS}

    async def create(request: Request) -> tuple[int, Any]:
        data = request.json()
        vendor = vendors.get(data.get("vendor_id"))
        if vendor is None:
            raise HTTPError(400, "invalid_request", "vendor_id must name a catalog vendor")
        raw_lines = data.get("lines")
        if not isinstance(raw_lines, list) or not raw_lines or len(raw_lines) > 50:
            raise HTTPError(400, "invalid_request", "lines must be a list of 1 to 50 items")
        lines, total = [], Decimal(0)
        for raw in raw_lines:
            if not isinstance(raw, dict):
                raise HTTPError(400, "invalid_request", "each line must be an object")
            item = items.get(raw.get("sku"))
            if item is None or item["vendor_id"] != vendor["id"]:
                raise HTTPError(
                    400, "invalid_request", f"{raw.get('sku')!r} is not an item of {vendor['name']}"
                )
            quantity = raw.get("quantity")
            if not isinstance(quantity, int) or isinstance(quantity, bool) or not 0 < quantity <= 10_000:
                raise HTTPError(400, "invalid_request", "quantity must be a whole number from 1 to 10000")
            unit_price = parse_money(raw.get("unit_price"), "unit_price")
            if unit_price != Decimal(item["unit_price"]):
                raise HTTPError(409, "price_changed", f"{item['sku']} costs {item['unit_price']} now")
            amount = unit_price * quantity
            total += amount
            lines.append(
                {
                    "sku": item["sku"],
                    "description": item["name"],
                    "quantity": quantity,
                    "unit_price": money(unit_price),
                    "amount": money(amount),
                }
            )
        budget_line = data.get("budget_line")
        if not isinstance(budget_line, str) or not budget_line:
            raise HTTPError(400, "invalid_request", "budget_line is required")
        who = request.who
        draft = store.add(
            {
                "status": "draft",
                "vendor_id": vendor["id"],
                "vendor": vendor["name"],
                "budget_line": budget_line,
                "currency": "USD",
                "lines": lines,
                "total": money(total),
                "justification": str(data.get("justification") or "")[:500],
                "drafted_at": now_iso(),
                "drafted_for": who.subject if who else None,
                "drafted_by": who.actor if who else None,
            }
        )
        return 201, {"draft": draft, "checked": checked_by(who)}

    async def get(request: Request) -> tuple[int, Any]:
        draft = store.get(request.match["po"])
        if draft is None:
            raise HTTPError(404, "not_found", "no such draft")
        return 200, {"draft": draft, "checked": checked_by(request.who)}

    async def list_drafts(request: Request) -> tuple[int, Any]:
        return 200, {"drafts": store.all(), "checked": checked_by(request.who)}

    system.route("POST", "/drafts", create)
    system.route("GET", "/drafts", list_drafts)
    system.route("GET", r"/drafts/(?P<po>[\w-]+)", get)
    return system


# --- 4. approval routing -------------------------------------------------------------------------

ROUTING_RULES = [
    # (up to this amount, approvers) — the first rule that covers the amount applies.
    (Decimal("10000.00"), ["Branch chief (budget holder)"]),
    (Decimal("50000.00"), ["Branch chief (budget holder)", "Division director"]),
    (None, ["Branch chief (budget holder)", "Division director", "Chief financial officer"]),
]


def routing_system() -> System:
    system = System("routing", "Approval routing")
    decisions: list[dict[str, Any]] = []
    lock = threading.Lock()

    async def route(request: Request) -> tuple[int, Any]:
        data = request.json()
        po = data.get("purchase_order")
        if not isinstance(po, str) or not re.fullmatch(r"PO-\d{4}-\d{4,}", po):
            raise HTTPError(400, "invalid_request", "purchase_order must look like PO-2026-0142")
        amount = parse_money(data.get("amount"), "amount")
        limit, approvers = next((lim, who) for lim, who in ROUTING_RULES if lim is None or amount <= lim)
        who = request.who
        with lock:
            decision = {
                "route_id": f"RT-{len(decisions) + 1:04d}",
                "purchase_order": po,
                "amount": money(amount),
                "currency": str(data.get("currency") or "USD"),
                "route": "standard" if len(approvers) == 1 else "escalated",
                "approvers": approvers,
                "status": "routed",
                "routed_at": now_iso(),
                "rule": f"amount <= {limit}" if limit is not None else "amount > 50000.00",
                "requested_for": who.subject if who else None,
                "requested_by": who.actor if who else None,
            }
            decisions.append(decision)
        return 201, {"decision": decision, "checked": checked_by(who)}

    async def list_routes(request: Request) -> tuple[int, Any]:
        with lock:
            return 200, {"decisions": list(decisions), "checked": checked_by(request.who)}

    system.route("POST", "/routes", route)
    system.route("GET", "/routes", list_routes)
    return system


# --- 5. financial ledger -------------------------------------------------------------------------

LEDGER_FIELDS = {"type", "actions", "purchase_order", "vendor", "amount", "currency"}


class Ledger:
    """Append-only JSON lines (``ledger.jsonl``), one entry per redeemed action token."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def entries(self) -> list[dict[str, Any]]:
        with self.lock:
            if not self.path.exists():
                return []
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            count = 0
            if self.path.exists():
                count = sum(1 for line in self.path.read_text().splitlines() if line.strip())
            record = {"seq": count + 1, **record}
            with self.path.open("a") as f:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return record


def ledger_entry_from(data: dict[str, Any]) -> dict[str, Any]:
    """The entry the ledger is asked to write, validated. It is also, verbatim, the one
    ``authorization_details`` object the action token must approve."""
    extra = set(data) - LEDGER_FIELDS
    missing = LEDGER_FIELDS - set(data)
    if missing or extra:
        raise HTTPError(
            400,
            "invalid_request",
            f"a ledger entry has exactly the fields {sorted(LEDGER_FIELDS)}"
            + (f"; missing {sorted(missing)}" if missing else "")
            + (f"; unknown {sorted(extra)}" if extra else ""),
        )
    if data["type"] != "ledger_entry" or data["actions"] != ["append"]:
        raise HTTPError(400, "invalid_request", 'type must be "ledger_entry" and actions ["append"]')
    if not isinstance(data["purchase_order"], str) or not re.fullmatch(
        r"PO-\d{4}-\d{4,}", data["purchase_order"]
    ):
        raise HTTPError(400, "invalid_request", "purchase_order must look like PO-2026-0142")
    if not isinstance(data["vendor"], str) or not 0 < len(data["vendor"]) <= 200:
        raise HTTPError(400, "invalid_request", "vendor must be a name")
    if not isinstance(data["currency"], str) or not re.fullmatch(r"[A-Z]{3}", data["currency"]):
        raise HTTPError(400, "invalid_request", "currency must be an ISO 4217 code")
    if not isinstance(data["amount"], str) or not re.fullmatch(r"\d{1,12}\.\d{2}", data["amount"]):
        raise HTTPError(400, "invalid_request", 'amount must be a decimal string with cents, e.g. "4250.00"')
    return data


def ledger_system(ledger: Ledger, verifier: TokenVerifier, *, public_url: str) -> System:
    system = System("ledger", "Financial ledger")

    async def append(request: Request) -> tuple[int, Any]:
        scheme, token = parse_authorization(request.header("authorization"))  # 401 without a token
        entry = ledger_entry_from(request.json())

        def verify_and_redeem() -> VerifiedToken:
            # Verifies the action token (signature, typ action+jwt, aud, exp, the user and the agent
            # against the registry, DPoP), recomputes the action hash from THIS entry, and redeems
            # the token at the server: exactly once, ever. Only then may the ledger write.
            return verifier.verify_action(
                token,
                expected_details=[entry],
                required_scopes=["ledger:write"],
                dpop_proof=request.header("dpop"),
                htm=request.method,
                htu=public_url.rstrip("/") + request.path,
                scheme=scheme,
            )

        who = await asyncio.to_thread(verify_and_redeem)
        request.scope["countersign"] = who  # for the access log
        record = ledger.append(
            {
                "recorded_at": now_iso(),
                "entry": entry,
                "approval_id": who.claims.get("approval_id"),
                "action_hash": who.claims.get("action_hash"),
                "token_jti": who.claims.get("jti"),
                "user": who.subject,
                "agent": who.actor,
                "grant_id": who.grant_id,
            }
        )
        return 201, {"recorded": record, "checked": checked_by(who)}

    async def list_entries(request: Request) -> tuple[int, Any]:
        entries = ledger.entries()
        po = request.query("purchase_order")
        if po:
            entries = [e for e in entries if e["entry"]["purchase_order"] == po]
        return 200, {"entries": entries, "count": len(entries)}

    system.route("POST", "/entries", append)
    system.route("GET", "/entries", list_entries)
    return system


# --- wiring --------------------------------------------------------------------------------------


class AccessLog:
    """Print one line per request: method, path, status and both principals when verified."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], name: str, quiet: bool
    ) -> None:
        self.app, self.name, self.quiet = app, name, quiet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.quiet or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        status = [0]
        started = time.monotonic()

        async def capture(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            who = scope.get("countersign")
            principal = f"  {who.subject} via {who.actor}" if who else ""
            ms = (time.monotonic() - started) * 1000
            print(
                f"[{self.name:<8}] {scope['method']} {scope['path']} -> {status[0]}{principal} ({ms:.0f} ms)",
                flush=True,
            )


class PortRouter:
    """One ASGI app for five sockets: dispatch each connection on the port it arrived on."""

    def __init__(self, apps: dict[int, Any]) -> None:
        self.apps = apps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        server: tuple[Any, Any] = scope.get("server") or (None, None)
        app = self.apps.get(server[1])
        if app is None:
            if scope["type"] == "http":
                await send_json(
                    send, 404, {"error": "not_found", "error_description": "no system on this port"}
                )
            return
        await app(scope, receive, send)


def build(
    config: dict[str, Any], *, issuer: str | None = None, data_dir: Path, quiet: bool = False
) -> tuple[PortRouter, dict[str, demo_config.SystemConfig]]:
    """The router and the systems it serves, each with its own verifier and credentials."""
    issuer = issuer or config["issuer"]
    systems = demo_config.systems(config)
    data_dir.mkdir(parents=True, exist_ok=True)
    # trust_env=False: the authorization server is on loopback, no proxy may sit in between.
    trust_env = not demo_config.is_loopback(issuer)

    def verifier(s: demo_config.SystemConfig, *, report_usage: bool = False) -> TokenVerifier:
        # report_usage: each accepted session-token use is reported back to Countersign (batched, off
        # the request path), so the officer's connection page shows what the agent did here.
        return TokenVerifier(
            issuer,
            audience=s.audience,
            client_id=s.client_id,
            client_secret=s.client_secret,
            http=httpx.Client(timeout=10.0, trust_env=trust_env, follow_redirects=False),
            report_usage=report_usage,
            usage_interval=0.5,
        )

    apps: dict[str, System] = {
        "catalog": catalog_system(),
        "budget": budget_system(),
        "drafting": drafting_system(DraftStore(data_dir / "drafts.json")),
        "routing": routing_system(),
        "ledger": ledger_system(
            Ledger(data_dir / "ledger.jsonl"),
            verifier(systems["ledger"]),
            public_url=systems["ledger"].audience,
        ),
    }
    by_port: dict[int, Any] = {}
    for key, app in apps.items():
        s = systems[key]
        wrapped: Any = app
        if key != "ledger":  # the ledger takes action tokens only, checked per request above
            # public_url: the DPoP htu is checked against the system's own URL, not the Host header.
            wrapped = CountersignMiddleware(
                app,
                verifier(s, report_usage=True),
                required_scopes=[s.scope],
                public_url=s.audience,
                exempt_paths=PUBLIC_PATHS,
            )
        by_port[s.port] = AccessLog(wrapped, key, quiet)
    return PortRouter(by_port), systems


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"cannot listen on {host}:{port}: {exc.strerror} (is the demo already running?)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the JSON printed by manage.py seed_demo --json")
    parser.add_argument("--issuer", help="the authorization server's issuer (default: the config's issuer)")
    parser.add_argument("--data-dir", default="var/demo", help="where drafts.json and ledger.jsonl live")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    args = parser.parse_args(argv)
    try:
        config = demo_config.load(args.config)
        router, systems = build(config, issuer=args.issuer, data_dir=Path(args.data_dir), quiet=args.quiet)
    except demo_config.ConfigError as exc:
        raise SystemExit(f"resource_servers: {exc}") from exc
    sockets = [bind("127.0.0.1", s.port) for s in systems.values()]
    issuer = args.issuer or config["issuer"]
    print(f"Procurement systems (tokens from {issuer}):", flush=True)
    for s in systems.values():
        kind = "action tokens only" if s.sensitivity == "step_up" else "session token"
        print(f"  {s.title:<22} {s.audience:<24} {s.scope:<15} {kind}", flush=True)
    print(
        f"  ledger entries: {systems['ledger'].url('/entries')} (file {Path(args.data_dir) / 'ledger.jsonl'})",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(router, lifespan="on", log_level="warning", access_log=False))
    asyncio.run(server.serve(sockets=sockets))


if __name__ == "__main__":
    main()

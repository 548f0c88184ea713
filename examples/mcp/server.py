"""An MCP server protected by Countersign: a vendor catalog on the session grant, and a ledger
whose every entry the user approves, call by call.

    python -m examples.mcp.server --config FILE --port PORT

FILE is what ``manage.py seed_demo --json`` prints; the server is the resource server whose
audience is ``http://127.0.0.1:PORT/mcp`` there, and ``COUNTERSIGN_ISSUER`` (default: the file's
issuer) names the authorization server. It speaks MCP over Streamable HTTP at ``/mcp`` (the
official ``mcp`` SDK's FastMCP), behind ``countersign.asgi.CountersignMiddleware``, which serves
the RFC 9728 metadata at ``/.well-known/oauth-protected-resource/mcp`` and answers every request
without a good token with a 401 naming it, so a stock MCP client discovers the rest.

- ``catalog_search(query)``: the catalog, for any token with the server's standard scope;
- ``ledger_append(amount, currency, vendor, purchase_order)``: marked ``@step_up(...)``; the
  server opens the approval for exactly these arguments, waits (progress notifications, the
  inbox URL as a URL elicitation), redeems the action token once, appends the entry and returns
  the ledger's receipt. Denied, expired or revoked: a tool error.
"""

import argparse
import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from mcp.server.fastmcp import FastMCP

from countersign import TokenVerifier
from countersign.asgi import CountersignMiddleware
from countersign.mcp import StepUp, approved_call

CATALOG = [
    {
        "sku": "ACME-CHAIR-01",
        "vendor": "Acme Office Supply",
        "item": "Ergonomic chair",
        "price": "170.00",
        "currency": "USD",
    },
    {
        "sku": "ACME-DESK-02",
        "vendor": "Acme Office Supply",
        "item": "Standing desk",
        "price": "540.00",
        "currency": "USD",
    },
    {
        "sku": "NORD-LAMP-07",
        "vendor": "Nordlicht GmbH",
        "item": "Desk lamp",
        "price": "45.00",
        "currency": "EUR",
    },
    {
        "sku": "NORD-SCRN-11",
        "vendor": "Nordlicht GmbH",
        "item": "27-inch monitor",
        "price": "310.00",
        "currency": "EUR",
    },
]


class ConfigError(Exception):
    pass


class Ledger:
    """Append-only entries, kept in memory and, with a path, as JSON lines."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def append(self, entry: dict[str, Any], *, approval: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            number = f"L-{len(self.entries) + 1:04d}"
            record = {"entry_id": number, "entry": entry, **approval}
            self.entries.append(record)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            return record


def server_config(config: dict[str, Any], port: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(this server's resource-server credentials, its scopes) from seed_demo --json output."""
    audience = f"http://127.0.0.1:{port}/mcp"
    server = next((s for s in config.get("resource_servers", []) if s.get("audience") == audience), None)
    if server is None:
        raise ConfigError(f"no resource server with the audience {audience} (seed_demo --mcp-port {port})")
    scopes = [s for s in config.get("scopes", []) if s.get("audience") == audience]
    if not any(s.get("sensitivity") == "standard" for s in scopes) or not any(
        s.get("sensitivity") == "step_up" for s in scopes
    ):
        raise ConfigError(f"{audience} needs a standard and a step-up scope")
    return server, scopes


def build(config: dict[str, Any], *, port: int, issuer: str, ledger: Ledger | None = None) -> Any:
    """The ASGI app: FastMCP's Streamable HTTP app behind Countersign."""
    server, scopes = server_config(config, port)
    audience = server["audience"]
    standard = [s["name"] for s in scopes if s["sensitivity"] == "standard"]
    step_up_scope = next(s["name"] for s in scopes if s["sensitivity"] == "step_up")
    verifier = TokenVerifier(
        issuer,
        audience=audience,
        client_id=server["client_id"],
        client_secret=server["client_secret"],
        scopes_supported=[s["name"] for s in scopes],
        resource_name="Countersign demo shop",
        http=httpx.Client(timeout=10.0, trust_env=False, follow_redirects=False),
    )
    ledger = ledger or Ledger()
    mcp = FastMCP("Countersign demo shop", host="127.0.0.1", port=port, streamable_http_path="/mcp")
    step_up = StepUp(verifier)

    @mcp.tool()
    async def catalog_search(query: str) -> list[dict[str, str]]:
        """Search the vendor catalog by item, vendor or SKU; prices are strings."""
        words = query.lower().split()
        return [item for item in CATALOG if all(w in " ".join(item.values()).lower() for w in words)]

    @mcp.tool()
    @step_up(step_up_scope)
    async def ledger_append(amount: str, currency: str, vendor: str, purchase_order: str) -> str:
        """Record a payment in the financial ledger. Needs the user's approval of exactly this entry:
        the call waits while they decide. Write the amount as a string, e.g. "4250.00"."""
        verified = approved_call.get()
        assert verified is not None  # set by @step_up once the approval was redeemed
        record = ledger.append(
            {"amount": amount, "currency": currency, "vendor": vendor, "purchase_order": purchase_order},
            approval={
                "approval_id": verified.claims.get("approval_id"),
                "user": verified.subject,
                "agent": verified.actor,
            },
        )
        return (
            f"Ledger receipt {record['entry_id']}: {amount} {currency} to {vendor} for {purchase_order}, "
            f"approved by {verified.subject} (approval {record['approval_id']})."
        )

    return CountersignMiddleware(
        mcp.streamable_http_app(), verifier, required_scopes=standard, public_url=f"http://127.0.0.1:{port}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the JSON printed by manage.py seed_demo --json")
    parser.add_argument("--port", type=int, default=8110)
    parser.add_argument("--ledger", help="append entries to this JSON-lines file too")
    args = parser.parse_args(argv)
    try:
        config = json.loads(Path(args.config).read_text())
        issuer = os.environ.get("COUNTERSIGN_ISSUER") or config["issuer"]
        app = build(
            config, port=args.port, issuer=issuer, ledger=Ledger(Path(args.ledger) if args.ledger else None)
        )
    except (OSError, ValueError, KeyError, ConfigError) as exc:
        raise SystemExit(f"examples.mcp.server: {exc}") from exc
    print(f"MCP server http://127.0.0.1:{args.port}/mcp (tokens from {issuer})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    asyncio.run(server.serve())


if __name__ == "__main__":
    main()

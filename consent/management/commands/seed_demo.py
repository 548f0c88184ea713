"""The reference scenario: a contracting officer, a procurement agent, five systems, five scopes."""

import json
import os
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from consent.conf import countersign_settings
from consent.models import Agent, ResourceServer, ScopePolicy
from consent.services import (
    agent_create,
    agent_reset_secret,
    resource_server_create,
    resource_server_reset_secret,
    scope_set,
)

DEMO_PASSWORD = os.environ.get("COUNTERSIGN_DEMO_PASSWORD", "countersign-demo")

SYSTEMS = [
    # (system name, audience, scope, description, sensitivity)
    (
        "Vendor catalog",
        "http://127.0.0.1:8101",
        "catalog:read",
        "Search the vendor catalog and read prices",
        ScopePolicy.Sensitivity.STANDARD,
    ),
    (
        "Budget",
        "http://127.0.0.1:8102",
        "budget:read",
        "Read your budget lines and remaining funds",
        ScopePolicy.Sensitivity.STANDARD,
    ),
    (
        "Procurement drafting",
        "http://127.0.0.1:8103",
        "po:draft",
        "Draft purchase orders (drafts only, nothing is sent)",
        ScopePolicy.Sensitivity.STANDARD,
    ),
    (
        "Approval routing",
        "http://127.0.0.1:8104",
        "approval:route",
        "Route a draft purchase order for internal approval",
        ScopePolicy.Sensitivity.STANDARD,
    ),
    (
        "Financial management log",
        "http://127.0.0.1:8105",
        "ledger:write",
        "Write an entry to the financial ledger",
        ScopePolicy.Sensitivity.STEP_UP,
    ),
]
# The MCP server (examples/mcp): its audience is its Streamable HTTP endpoint.
MCP_PORT = int(os.environ.get("COUNTERSIGN_DEMO_MCP_PORT", "8110"))
MCP_SCOPES = [
    # (scope, description, sensitivity)
    (
        "shop:catalog",
        "Search the shop's vendor catalog (MCP tool catalog_search)",
        ScopePolicy.Sensitivity.STANDARD,
    ),
    (
        "shop:ledger",
        "Record payments in the shop's ledger (MCP tool ledger_append)",
        ScopePolicy.Sensitivity.STEP_UP,
    ),
]
# Above this, the officer's approval alone is not enough: a member of finance must also approve.
FINANCE_GROUP = "finance"
QUORUM_WHEN = "amount > 10000"
AGENT_NAME = "Procurement Agent"
AGENT_REDIRECT = "http://127.0.0.1:8199/callback"


# Secrets are stored hashed: an existing one cannot be shown again. Scripts see None in --json.
KEPT = "(kept from an earlier run: stored hashed, not shown; --rotate-secrets issues a new one)"


class Command(BaseCommand):
    help = (
        "Create the reference scenario's data (idempotent). Existing records and their secrets are kept "
        "unless --rotate-secrets; --json prints credentials for scripts."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true")
        parser.add_argument(
            "--mcp-port",
            type=int,
            default=MCP_PORT,
            help="port of the MCP server (examples.mcp.server); its audience is http://127.0.0.1:PORT/mcp",
        )
        parser.add_argument(
            "--rotate-secrets",
            action="store_true",
            help="issue new secrets for the demo agent and resource servers (the old ones stop working)",
        )

    @transaction.atomic
    def handle(self, *args: Any, **o: Any) -> None:
        User = get_user_model()
        users = []
        names = {
            "officer": ("Contracting", "Officer"),
            "admin": ("Admin", ""),
            "comptroller": ("Finance", "Comptroller"),
        }
        for username, is_admin in (("officer", False), ("admin", True), ("comptroller", False)):
            user, created = User.objects.get_or_create(
                username=username,
                defaults={
                    "is_staff": is_admin,
                    "is_superuser": is_admin,
                    "first_name": names[username][0],
                    "last_name": names[username][1],
                },
            )
            if created:
                user.set_password(DEMO_PASSWORD)
                user.save()
            users.append(
                {
                    "username": username,
                    "password": DEMO_PASSWORD
                    if created or user.check_password(DEMO_PASSWORD)
                    else "(unchanged: set before this run)",
                }
            )
        # Two-person approval: a ledger entry above 10,000 needs the comptroller's signature as well.
        finance, _ = Group.objects.get_or_create(name=FINANCE_GROUP)
        finance.user_set.add(User.objects.get(username="comptroller"))

        servers, scopes = [], []
        for name, audience, scope, description, sensitivity in SYSTEMS:
            values: dict[str, Any] = {
                "audience": audience,
                "sensitivity": sensitivity,
                "description": description,
            }
            if sensitivity == ScopePolicy.Sensitivity.STEP_UP:
                values |= {
                    "approval_window": 600,
                    "action_token_ttl": 120,
                    "authorization_details_types": ["ledger_entry"],
                    "quorum": 2,
                    "approver_group_id": finance.pk,
                    "quorum_when": QUORUM_WHEN,
                }
            policy = ScopePolicy.objects.filter(name=scope).first()
            if policy is None:
                policy, _ = scope_set(name=scope, values=values, actor="seed_demo")
            # What the database holds, which an admin may have changed since the first run.
            scopes.append(
                {"name": policy.name, "sensitivity": policy.sensitivity, "audience": policy.audience}
            )
            rs = ResourceServer.objects.filter(audience=audience).first()
            secret: str | None = None
            if rs is None:
                rs, secret = resource_server_create(name=name, audience=audience, actor="seed_demo")
            elif o["rotate_secrets"]:
                secret = resource_server_reset_secret(rs=rs, actor="seed_demo")
            servers.append(
                {"name": rs.name, "audience": rs.audience, "client_id": rs.client_id, "client_secret": secret}
            )

        mcp_server, mcp_scopes = self._mcp_server(o["mcp_port"], o["rotate_secrets"])
        servers.append(mcp_server)
        scopes.extend(mcp_scopes)

        agent = Agent.objects.filter(name=AGENT_NAME).first()
        all_scopes = [s["name"] for s in scopes if s not in mcp_scopes]
        if agent is None:
            agent, secret = agent_create(
                name=AGENT_NAME,
                publisher="Countersign reference scenario",
                description="Finds a vendor, checks the budget, drafts and routes a purchase order, "
                "then records it in the financial ledger.",
                scopes=all_scopes,
                redirect_uris=[AGENT_REDIRECT],
                actor="seed_demo",
            )
            agent.refresh_from_db()
        elif o["rotate_secrets"]:
            secret = agent_reset_secret(agent=agent, actor="seed_demo")
        else:
            secret = None
        agents = [
            {
                "name": agent.name,
                "client_id": agent.client_id,
                "client_secret": secret,
                "redirect_uris": agent.redirect_uris.split(),
                "scopes": list(agent.allowed_scopes),
            }
        ]

        result = {
            "issuer": countersign_settings.ISSUER,
            "users": users,
            "agents": agents,
            "resource_servers": servers,
            "scopes": scopes,
        }
        if o["json"]:
            self.stdout.write(json.dumps(result))
            return
        self.stdout.write("Demo data ready.")
        for u in users:
            self.stdout.write(f"  login {u['username']} / {u['password']}")
        self.stdout.write(f"  agent {agent.name}: client_id {agent.client_id} secret {secret or KEPT}")
        for s in servers:
            self.stdout.write(
                f"  resource server {s['name']} ({s['audience']}): {s['client_id']} "
                f"secret {s['client_secret'] or KEPT}"
            )

    @staticmethod
    def _mcp_server(port: int, rotate: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The MCP server as a resource server, with its scopes (MCP clients join by themselves)."""
        audience = f"http://127.0.0.1:{port}/mcp"
        scopes = []
        for scope, description, sensitivity in MCP_SCOPES:
            values: dict[str, Any] = {
                "audience": audience,
                "sensitivity": sensitivity,
                "description": description,
            }
            if sensitivity == ScopePolicy.Sensitivity.STEP_UP:
                values |= {
                    "approval_window": 300,
                    "action_token_ttl": 60,
                    "authorization_details_types": ["mcp_tool_call"],
                }
            if not ScopePolicy.objects.filter(name=scope, audience=audience).exists():
                scope_set(name=scope, values=values, actor="seed_demo")
            scopes.append({"name": scope, "sensitivity": sensitivity, "audience": audience})
        rs = ResourceServer.objects.filter(audience=audience).first()
        secret: str | None
        if rs is None:
            rs, secret = resource_server_create(
                name="Shop (MCP server)", audience=audience, actor="seed_demo"
            )
        else:  # kept, as the other systems' secrets are, unless asked to rotate
            secret = resource_server_reset_secret(rs=rs, actor="seed_demo") if rotate else None
        return {
            "name": rs.name,
            "audience": rs.audience,
            "client_id": rs.client_id,
            "client_secret": secret,
        }, scopes

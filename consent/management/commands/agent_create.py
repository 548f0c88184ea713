import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from consent.conf import countersign_settings
from consent.models import Agent
from consent.services import agent_create, agent_update

from ._common import load_jwks, run_service


class Command(BaseCommand):
    help = "Register an agent (an OAuth client). Prints its client id and secret once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--publisher", required=True)
        parser.add_argument(
            "--scopes", required=True, help='space-separated, e.g. "catalog:read ledger:write"'
        )
        parser.add_argument("--redirect-uri", required=True, action="append", dest="redirect_uris")
        parser.add_argument("--description", default="")
        parser.add_argument(
            "--refresh-mode", choices=Agent.RefreshMode.values, default=Agent.RefreshMode.ROTATING
        )
        parser.add_argument(
            "--ttl",
            type=int,
            help=f"access-token lifetime in seconds (default {countersign_settings.DEFAULT_ACCESS_TOKEN_TTL})",
        )
        parser.add_argument(
            "--jwks", help="file holding the agent's public JWK Set (enables private_key_jwt)"
        )
        parser.add_argument(
            "--delegates", default="", help="space-separated client ids of permitted sub-agents"
        )
        parser.add_argument(
            "--notification-endpoint",
            default="",
            help="CIBA ping-mode notification endpoint (empty: the agent polls)",
        )
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **o: Any) -> None:
        agent, secret = run_service(
            agent_create,
            name=o["name"],
            publisher=o["publisher"],
            scopes=o["scopes"].split(),
            redirect_uris=o["redirect_uris"],
            description=o["description"],
            refresh_mode=o["refresh_mode"],
            ttl=o["ttl"],
            jwks=load_jwks(o["jwks"]),
            actor="cli",
        )
        extra = {}
        if o["delegates"]:
            extra["delegates"] = o["delegates"].split()
        if o["notification_endpoint"]:
            extra["backchannel_client_notification_endpoint"] = o["notification_endpoint"]
        if extra:
            run_service(agent_update, agent=agent, changes=extra, actor="cli")
        out = {
            "name": agent.name,
            "client_id": agent.client_id,
            "client_secret": secret,
            "redirect_uris": agent.redirect_uris.split(),
            "scopes": agent.allowed_scopes,
        }
        if o["json"]:
            self.stdout.write(json.dumps(out))
        else:
            self.stdout.write(
                f"Registered agent {agent.name}\n  client_id:     {agent.client_id}\n"
                f"  client_secret: {secret}   (shown once; stored hashed)"
            )

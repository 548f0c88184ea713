from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from consent.models import Agent
from consent.services import agent_update

from ._common import load_jwks, run_service


class Command(BaseCommand):
    help = "Change an agent's refresh mode, TTL, keys, status or scopes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("client_id")
        parser.add_argument("--refresh-mode", choices=Agent.RefreshMode.values)
        parser.add_argument("--ttl", type=int)
        parser.add_argument("--jwks")
        parser.add_argument("--status", choices=Agent.Status.values)
        parser.add_argument("--scopes")
        parser.add_argument("--delegates", help="space-separated client ids of permitted sub-agents")
        parser.add_argument(
            "--require-dpop",
            choices=["yes", "no"],
            help="tokens only with a DPoP proof by a registered key (RFC 9449)",
        )
        parser.add_argument(
            "--notification-endpoint", help="CIBA ping-mode endpoint; empty string for poll mode"
        )

    def handle(self, *args: Any, **o: Any) -> None:
        agent = Agent.objects.filter(client_id=o["client_id"]).first()
        if agent is None:
            raise CommandError(f"no agent with client id {o['client_id']}")
        changes = {}
        if o["refresh_mode"]:
            changes["refresh_mode"] = o["refresh_mode"]
        if o["ttl"] is not None:
            changes["access_token_ttl"] = o["ttl"]
        if o["jwks"]:
            changes["jwks"] = load_jwks(o["jwks"])
        if o["status"]:
            changes["status"] = o["status"]
        if o["scopes"] is not None:
            changes["allowed_scopes"] = o["scopes"].split()
        if o["require_dpop"] is not None:
            changes["require_dpop"] = o["require_dpop"] == "yes"
        if o["delegates"] is not None:
            changes["delegates"] = o["delegates"].split()
        if o["notification_endpoint"] is not None:
            changes["backchannel_client_notification_endpoint"] = o["notification_endpoint"]
        if not changes:
            raise CommandError("nothing to change")
        run_service(agent_update, agent=agent, changes=changes, actor="cli")
        self.stdout.write(f"Updated {agent.name}: {', '.join(sorted(changes))}")

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from consent.models import ScopePolicy
from consent.services import scope_set

from ._common import run_service


class Command(BaseCommand):
    help = "Create or change a scope policy."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--audience", required=True)
        parser.add_argument("--sensitivity", required=True, choices=ScopePolicy.Sensitivity.values)
        parser.add_argument("--description")
        parser.add_argument("--approval-window", type=int)
        parser.add_argument("--action-ttl", type=int)
        parser.add_argument("--fresh-auth", type=int)
        parser.add_argument("--auto-approve")
        parser.add_argument("--authorization-details-types", help="space-separated RFC 9396 types")

    def handle(self, *args: Any, **o: Any) -> None:
        values = {"audience": o["audience"], "sensitivity": o["sensitivity"]}
        optional = {
            "description": "description",
            "approval_window": "approval_window",
            "action_ttl": "action_token_ttl",
            "fresh_auth": "fresh_auth_seconds",
            "auto_approve": "auto_approve_rule",
        }
        for option, field in optional.items():
            if o[option] is not None:
                values[field] = o[option]
        if o["authorization_details_types"] is not None:
            values["authorization_details_types"] = o["authorization_details_types"].split()
        policy, created = run_service(scope_set, name=o["name"], values=values, actor="cli")
        self.stdout.write(f"{'Created' if created else 'Updated'} scope {policy.name} ({policy.sensitivity})")

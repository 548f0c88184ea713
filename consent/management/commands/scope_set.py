import argparse
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError, CommandParser

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
        parser.add_argument("--budget-currency", help="ISO 4217 code budgets are kept in, e.g. USD")
        parser.add_argument(
            "--budget-max-per-action", type=Decimal, help="largest per-action ceiling users may set"
        )
        parser.add_argument("--budget-max-total", type=Decimal, help="largest total per period users may set")
        parser.add_argument("--budget-periods", help='space-separated, of "day week month"')
        parser.add_argument("--quorum", type=int, help="approvals needed (two-person approval: 2)")
        parser.add_argument(
            "--approver-group", help="the Django group whose members may approve ('' for none)"
        )
        parser.add_argument(
            "--exclude-requester",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="the user the agent acts for may not approve their own request",
        )
        parser.add_argument(
            "--quorum-when", help="only requests matching this rule need the quorum, e.g. 'amount > 10000'"
        )

    def handle(self, *args: Any, **o: Any) -> None:
        values = {"audience": o["audience"], "sensitivity": o["sensitivity"]}
        optional = {
            "description": "description",
            "approval_window": "approval_window",
            "action_ttl": "action_token_ttl",
            "fresh_auth": "fresh_auth_seconds",
            "auto_approve": "auto_approve_rule",
            "budget_currency": "budget_currency",
            "budget_max_per_action": "budget_max_per_action",
            "budget_max_total": "budget_max_total",
            "quorum": "quorum",
            "exclude_requester": "exclude_requester",
            "quorum_when": "quorum_when",
        }
        for option, field in optional.items():
            if o[option] is not None:
                values[field] = o[option]
        if o["authorization_details_types"] is not None:
            values["authorization_details_types"] = o["authorization_details_types"].split()
        if o["budget_periods"] is not None:
            values["budget_periods"] = o["budget_periods"].split()
        if o["approver_group"] is not None:
            group = Group.objects.filter(name=o["approver_group"]).first() if o["approver_group"] else None
            if o["approver_group"] and group is None:
                raise CommandError(f"no group named {o['approver_group']!r}: create it first (admin, Groups)")
            values["approver_group_id"] = group.pk if group is not None else None
        policy, created = run_service(scope_set, name=o["name"], values=values, actor="cli")
        self.stdout.write(f"{'Created' if created else 'Updated'} scope {policy.name} ({policy.sensitivity})")

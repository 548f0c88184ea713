import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from consent.services import resource_server_create

from ._common import run_service


class Command(BaseCommand):
    help = "Register a downstream system (resource server). Prints its credentials once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--audience", required=True)
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **o: Any) -> None:
        rs, secret = run_service(resource_server_create, name=o["name"], audience=o["audience"], actor="cli")
        out = {"name": rs.name, "audience": rs.audience, "client_id": rs.client_id, "client_secret": secret}
        if o["json"]:
            self.stdout.write(json.dumps(out))
        else:
            self.stdout.write(
                f"Registered {rs.name} ({rs.audience})\n  client_id:     {rs.client_id}\n"
                f"  client_secret: {secret}   (shown once; stored hashed)"
            )

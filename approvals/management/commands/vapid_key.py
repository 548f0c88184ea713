"""Show (creating on first use) or rotate the VAPID key pair that signs Web Push messages (RFC 8292)."""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from approvals.notify.webpush import vapid_contact, vapid_key, vapid_key_create
from audit.services import audit_record


class Command(BaseCommand):
    help = (
        "Print the VAPID public key (the applicationServerKey browsers subscribe with), creating the key pair "
        "on first use. --rotate makes a new pair: every device must subscribe again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rotate", action="store_true")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **o: Any) -> None:
        if o["rotate"]:
            key = vapid_key_create()
            audit_record(event="vapid_key.rotated", actor="cli", detail={"public_key": key.public_key})
        else:
            key = vapid_key()
        if o["json"]:
            self.stdout.write(json.dumps({"public_key": key.public_key, "contact": vapid_contact()}))
        else:
            self.stdout.write(f"VAPID public key: {key.public_key}\nContact (sub): {vapid_contact()}")

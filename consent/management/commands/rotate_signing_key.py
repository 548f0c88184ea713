from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from audit.services import audit_record
from consent.keys import SUPPORTED_ALGS, signing_key_create


class Command(BaseCommand):
    help = "Make a new active signing key. The old key stays in the JWKS until its tokens have expired."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--alg", choices=SUPPORTED_ALGS)

    def handle(self, *args: Any, **o: Any) -> None:
        key = signing_key_create(alg=o["alg"])
        audit_record(event="signing_key.rotated", actor="cli", detail={"kid": key.kid, "alg": key.alg})
        self.stdout.write(f"Active signing key is now {key.kid} ({key.alg})")

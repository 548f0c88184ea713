import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.readers import ReaderError, audit_reader_create, audit_reader_revoke


class Command(BaseCommand):
    help = (
        "Issue (create NAME) or revoke (revoke NAME) a token for pulling the audit log from /audit/events/ and "
        "proofs from /audit/proofs/ (a SIEM or log shipper). The token is shown once; only its hash is kept."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["create", "revoke"])
        parser.add_argument("name")
        parser.add_argument("--json", action="store_true", help="print {name, token} as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["action"] == "revoke":
                audit_reader_revoke(name=options["name"], actor="cli")
                self.stdout.write(f"revoked audit reader {options['name']}")
                return
            reader, token = audit_reader_create(name=options["name"], actor="cli")
        except ReaderError as exc:
            raise CommandError(str(exc)) from None
        if options["json"]:
            self.stdout.write(json.dumps({"name": reader.name, "token": token}))
        else:
            self.stdout.write(
                f"audit reader {reader.name}: token {token} (shown once; send it as "
                "Authorization: Bearer <token>)"
            )

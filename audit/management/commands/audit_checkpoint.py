import json
from collections.abc import Iterable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.ledger import append_checkpoint_file, checkpoint_document, server_jwks
from audit.models import AuditCheckpoint
from audit.services import audit_seal_all


class Command(BaseCommand):
    help = (
        "Print the newest signed audit checkpoint (JSON), or export checkpoints: --all, --since TREE_SIZE, "
        "--output FILE (JSON lines, appended: the format audit_verify --checkpoint reads). --jwks also prints "
        "the public keys that signed them, to keep beside them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--size", type=int, metavar="TREE_SIZE", help="the checkpoint of this tree size")
        parser.add_argument("--all", action="store_true", help="every checkpoint, oldest first")
        parser.add_argument("--since", type=int, metavar="TREE_SIZE", help="checkpoints larger than this")
        parser.add_argument("--output", metavar="FILE", help="append the checkpoints to FILE (JSON lines)")
        parser.add_argument(
            "--jwks", action="store_true", help="print the JWKS of every key the server holds"
        )
        parser.add_argument(
            "--seal", action="store_true", help="seal waiting events first (a fresh checkpoint)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["jwks"]:
            self.stdout.write(json.dumps(server_jwks(), indent=2))
            return
        if options["seal"]:
            audit_seal_all()
        ordered = AuditCheckpoint.objects.order_by("tree_size")
        checkpoints: Iterable[AuditCheckpoint] = ordered
        if options["size"] is not None:
            checkpoints = ordered.filter(tree_size=options["size"])
        elif options["since"] is not None:
            checkpoints = ordered.filter(tree_size__gt=options["since"])
        elif not options["all"]:
            newest = AuditCheckpoint.objects.order_by("-tree_size").first()
            checkpoints = [newest] if newest else []
        documents = [checkpoint_document(cp) for cp in checkpoints]
        if not documents and (
            options["size"] is not None or not (options["all"] or options["since"] is not None)
        ):
            raise CommandError(
                "no such checkpoint" if options["size"] is not None else "no checkpoint signed yet"
            )
        if options["output"]:
            for document in documents:
                append_checkpoint_file(options["output"], document)
            self.stdout.write(f"appended {len(documents)} checkpoint(s) to {options['output']}")
        elif len(documents) == 1 and not (options["all"] or options["since"] is not None):
            self.stdout.write(json.dumps(documents[0], indent=2))
        else:
            for document in documents:
                self.stdout.write(json.dumps(document, separators=(",", ":")))

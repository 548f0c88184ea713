import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.conf import audit_settings
from audit.ledger import checkpoint_from_document, newest_in_file
from audit.models import AuditCheckpoint, AuditLink
from audit.selectors import audit_unsealed_count
from audit.services import audit_seal_all
from audit.verification import audit_chain_breaks, kept_checkpoint
from countersign.ledger import LedgerError

SHOWN = 50


class Command(BaseCommand):
    help = (
        "Seal what can be sealed, then check the audit ledger: every event against its chain link and leaf, "
        "the Merkle tree, every checkpoint's signature and its place after the one before, and that the "
        "ledger holds every event the newest checkpoint (and any kept elsewhere) signs. Exits non-zero "
        "naming the first bad position."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--no-seal",
            action="store_true",
            help="only read: do not link waiting events first (e.g. on a read-only replica)",
        )
        parser.add_argument(
            "--checkpoint",
            action="append",
            default=[],
            metavar="FILE",
            help="a checkpoint kept elsewhere (as audit_checkpoint prints it; a JSON-lines file: "
            "its last line); may be repeated",
        )
        parser.add_argument(
            "--jwks",
            metavar="FILE",
            help="check signatures with this JWKS instead of every key the server holds",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        jwks = self._json(options["jwks"]) if options["jwks"] else None
        kept_files = list(options["checkpoint"])
        sink = audit_settings.AUDIT_CHECKPOINT_FILE
        if sink:
            kept_files.append(sink)
        kept = []
        for path in kept_files:
            try:
                document = newest_in_file(path)
                if document is None:
                    if path != sink:
                        raise CommandError(f"{path}: no checkpoint in it")
                    continue
                kept.append(kept_checkpoint(checkpoint_from_document(document), jwks))
            except LedgerError as exc:
                raise CommandError(
                    f"{path}: the kept checkpoint does not verify: {exc.description}"
                ) from None
        sealed = 0 if options["no_seal"] else audit_seal_all()
        breaks = list(audit_chain_breaks(kept=kept, jwks=jwks))
        for b in breaks[:SHOWN]:
            self.stderr.write(str(b))
        if len(breaks) > SHOWN:
            self.stderr.write(f"... and {len(breaks) - SHOWN} more")
        if breaks:
            raise CommandError(f"audit ledger broken in {len(breaks)} place(s)")
        unsealed = audit_unsealed_count()
        note = (
            f"; {unsealed} newer events not sealed yet (their transactions, or older ones, are still open)"
            if unsealed
            else ""
        )
        latest = AuditCheckpoint.objects.order_by("-tree_size").first()
        signed = f", signed by checkpoint {latest.tree_size} (root {latest.root_hash})" if latest else ""
        also = f"; matches {len(kept)} checkpoint(s) kept elsewhere" if kept else ""
        self.stdout.write(
            f"audit chain intact: {AuditLink.objects.count()} events (sealed {sealed} now)"
            f"{signed}{also}{note}"
        )

    def _json(self, path: str) -> Any:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{path}: {exc}") from None

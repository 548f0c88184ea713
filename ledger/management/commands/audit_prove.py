import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.proofs import ProofUnavailable, approval_decision_event, consistency_bundle, inclusion_bundle


class Command(BaseCommand):
    help = (
        "Print a proof as JSON: that an audit event is in the signed ledger (RFC 9162 §2.1.3 inclusion), or "
        "with --consistency OLD NEW that checkpoint NEW extends checkpoint OLD (§2.1.4). Check it offline "
        "with: python -m countersign.ledger inclusion|consistency FILE --jwks JWKS"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("event_id", nargs="?", type=int, help="the audit event's id")
        parser.add_argument(
            "--checkpoint",
            type=int,
            metavar="TREE_SIZE",
            help="prove against this checkpoint (default: the newest)",
        )
        parser.add_argument(
            "--consistency", nargs=2, type=int, metavar=("OLD", "NEW"), help="tree sizes of two checkpoints"
        )
        parser.add_argument(
            "--approval", metavar="APPROVAL_ID", help="prove the event that approved this approval"
        )
        parser.add_argument("--output", metavar="FILE", help="write the proof here instead of stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["consistency"]:
                if options["event_id"] is not None:
                    raise CommandError("give an event id or --consistency OLD NEW, not both")
                first, second = options["consistency"]
                proof = consistency_bundle(first=first, second=second)
            elif options["approval"]:
                from approvals.models import ApprovalRequest

                approval = ApprovalRequest.objects.filter(pk=options["approval"]).first()
                if approval is None:
                    raise CommandError(f"there is no approval {options['approval']}")
                event_id = approval_decision_event(
                    approval_id=str(approval.pk), grant_id=str(approval.grant_id)
                )
                proof = inclusion_bundle(event_id=event_id, tree_size=options["checkpoint"])
            elif options["event_id"] is not None:
                proof = inclusion_bundle(event_id=options["event_id"], tree_size=options["checkpoint"])
            else:
                raise CommandError("give an event id, or --consistency OLD NEW")
        except ProofUnavailable as exc:
            raise CommandError(str(exc)) from None
        text = json.dumps(proof, indent=2)
        if options["output"]:
            with open(options["output"], "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        else:
            self.stdout.write(text)

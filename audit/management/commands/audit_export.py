from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.export import FORMATS, ExportFilterError, document, parse_when, render, sealed_events


class Command(BaseCommand):
    help = (
        "Export sealed audit events in position order, each with its tree position (schema countersign.audit.v1: "
        "see audit/export.py and docs/audit.md): JSON Lines (default), CSV or OCSF JSON Lines."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=FORMATS, default="jsonl")
        parser.add_argument("--since", help="events at or after this ISO 8601 date or date-time")
        parser.add_argument(
            "--until", help="events before this date-time (a date: up to the end of that day)"
        )
        parser.add_argument("--principal", help="user:<pk>, agent:<client_id>, rs:<client_id> or admin:<pk>")
        parser.add_argument("--after", type=int, default=0, metavar="SEQ", help="only positions after SEQ")
        parser.add_argument("--output", metavar="FILE", help="write here instead of stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            links = sealed_events(
                after=options["after"],
                since=parse_when(options["since"], name="--since") if options["since"] else None,
                until=parse_when(options["until"], name="--until", end=True) if options["until"] else None,
                principal=options["principal"],
            )
            chunks = render((document(link) for link in links.iterator(chunk_size=2000)), options["format"])
            out = open(options["output"], "w", encoding="utf-8", newline="") if options["output"] else None
            try:
                for chunk in chunks:
                    if out:
                        out.write(chunk)
                    else:
                        self.stdout.write(chunk, ending="")
            finally:
                if out:
                    out.close()
        except ExportFilterError as exc:
            raise CommandError(str(exc)) from None

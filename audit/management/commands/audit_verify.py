from django.core.management.base import BaseCommand, CommandError

from audit.models import AuditLink
from audit.services import audit_chain_breaks, audit_seal_all, audit_unsealed_count


class Command(BaseCommand):
    help = ("Seal what can be sealed, then walk the audit hash chain; exit non-zero on a broken, edited or "
            "removed event or link.")

    def add_arguments(self, parser):
        parser.add_argument("--no-seal", action="store_true",
                            help="only read: do not link waiting events first (e.g. on a read-only replica)")

    def handle(self, *args, **options):
        sealed = 0 if options["no_seal"] else audit_seal_all()
        breaks = list(audit_chain_breaks())
        for b in breaks:
            self.stderr.write(str(b))
        if breaks:
            raise CommandError(f"audit chain broken in {len(breaks)} place(s)")
        unsealed = audit_unsealed_count()
        note = f"; {unsealed} newer events not sealed yet (their transactions, or older ones, are still open)" \
            if unsealed else ""
        self.stdout.write(f"audit chain intact: {AuditLink.objects.count()} events (sealed {sealed} now){note}")

from django.core.management.base import BaseCommand, CommandError

from audit.models import AuditEvent
from audit.services import audit_chain_breaks


class Command(BaseCommand):
    help = "Walk the audit hash chain; exit non-zero on a broken, edited or removed event."

    def handle(self, *args, **options):
        breaks = list(audit_chain_breaks())
        for b in breaks:
            self.stderr.write(f"event {b.seq}: {b.reason}")
        if breaks:
            raise CommandError(f"audit chain broken in {len(breaks)} place(s)")
        self.stdout.write(f"audit chain intact: {AuditEvent.objects.count()} events")

"""Audit events are written by every request and searched by admins with ``icontains`` (``UPPER(...)
LIKE '%...%'``), which a ``varchar_pattern_ops`` index cannot serve: drop the three Django added
beside the indexes of ``event``, ``client_id`` and ``grant_id`` (those stay)."""

from django.db import migrations

from audit.schema import drop_pattern_indexes


class Migration(migrations.Migration):
    dependencies = [("audit", "0005_ledger")]
    operations = [drop_pattern_indexes("audit_auditevent", ["event", "client_id", "grant_id"])]

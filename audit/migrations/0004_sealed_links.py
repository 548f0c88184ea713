"""Lock-free appends: events carry their writing transaction, the chain moves to ``AuditLink``.

Existing events keep their place: each one's ``seq``, ``prev_hash`` and ``hash`` move
verbatim into a link row (the hash formula is unchanged), so the chain written before
this migration still verifies. The link table gets the same append-only trigger as the
event table.
"""

import django.db.models.deletion
from django.db import migrations, models

import audit.models

TRIGGER = """
DROP TRIGGER IF EXISTS audit_link_append_only ON audit_auditlink;
CREATE TRIGGER audit_link_append_only BEFORE UPDATE OR DELETE ON audit_auditlink
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();
"""


def move_chain_to_links(apps, schema_editor):
    AuditEvent = apps.get_model("audit", "AuditEvent")
    AuditLink = apps.get_model("audit", "AuditLink")
    batch = []
    for seq, pk, prev_hash, hash_, occurred_at in (
        AuditEvent.objects.order_by("seq")
        .values_list("seq", "pk", "prev_hash", "hash", "occurred_at")
        .iterator(chunk_size=2000)
    ):
        batch.append(AuditLink(seq=seq, event_id=pk, prev_hash=prev_hash, hash=hash_, sealed_at=occurred_at))
        if len(batch) == 2000:
            AuditLink.objects.bulk_create(batch)
            batch = []
    AuditLink.objects.bulk_create(batch)


def protect_links(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(TRIGGER, params=None)


def unprotect_links(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "DROP TRIGGER IF EXISTS audit_link_append_only ON audit_auditlink;", params=None
        )


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_append_only_trigger")]

    operations = [
        migrations.AddField(
            model_name="auditevent",
            name="xid",
            field=audit.models.TransactionIdField(default=0, editable=False),
        ),
        migrations.CreateModel(
            name="AuditLink",
            fields=[
                ("seq", models.BigIntegerField(editable=False, primary_key=True, serialize=False)),
                ("prev_hash", models.CharField(editable=False, max_length=64)),
                ("hash", models.CharField(editable=False, max_length=64)),
                ("sealed_at", models.DateTimeField(editable=False)),
                (
                    "event",
                    models.OneToOneField(
                        db_constraint=False,
                        editable=False,
                        on_delete=django.db.models.deletion.DO_NOTHING,
                        related_name="link",
                        to="audit.auditevent",
                    ),
                ),
            ],
            options={"ordering": ["seq"]},
        ),
        migrations.RunPython(move_chain_to_links, migrations.RunPython.noop),
        migrations.AlterModelOptions(
            name="auditevent",
            options={"ordering": ["-occurred_at", "-id"], "verbose_name": "audit event"},
        ),
        migrations.RemoveField(model_name="auditevent", name="seq"),
        migrations.RemoveField(model_name="auditevent", name="prev_hash"),
        migrations.RemoveField(model_name="auditevent", name="hash"),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["xid", "id"], name="audit_event_xid_id"),
        ),
        migrations.AddField(
            model_name="audithead", name="floor", field=audit.models.TransactionIdField(default=0)
        ),
        migrations.AddField(model_name="audithead", name="sealed_at", field=models.DateTimeField(null=True)),
        migrations.AddField(model_name="audithead", name="lag_buckets", field=models.JSONField(default=list)),
        migrations.AddField(model_name="audithead", name="lag_sum", field=models.FloatField(default=0.0)),
        migrations.AddField(
            model_name="audithead", name="lag_count", field=models.BigIntegerField(default=0)
        ),
        migrations.RunPython(protect_links, unprotect_links),
    ]

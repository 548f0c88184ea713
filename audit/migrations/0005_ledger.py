"""The signed Merkle ledger (RFC 9162 §2.1) over the sealed events, and TRUNCATE refused.

- ``AuditLink.leaf``: each sealed event's leaf hash; events sealed before this migration get
  theirs here, with the tree's stored nodes and the sealer's frontier, so the next sealer batch
  signs a first checkpoint over all of them.
- ``AuditNode`` / ``AuditCheckpoint``: append-only like events and links (row triggers refuse
  UPDATE and DELETE).
- On PostgreSQL a statement-level trigger refuses TRUNCATE on every audit table (row triggers
  never see a TRUNCATE), and the head row cannot be deleted. Only a role that owns the table
  may lift the refusal, for its own session, with ``SET countersign.audit_truncate = 'allow'``
  (test databases are emptied between tests that way); the application's role owns nothing
  (``manage.py audit_grants``), so it cannot.
"""

from django.db import migrations, models

AUDIT_TABLES = (
    "audit_auditevent",
    "audit_auditlink",
    "audit_auditnode",
    "audit_auditcheckpoint",
    "audit_audithead",
)

CREATE = """
CREATE OR REPLACE FUNCTION audit_no_truncate() RETURNS trigger AS $$
BEGIN
    IF current_setting('countersign.audit_truncate', true) = 'allow'
       AND pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'MEMBER') THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'audit tables are append-only (TRUNCATE % refused)', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS audit_node_append_only ON audit_auditnode;
CREATE TRIGGER audit_node_append_only BEFORE UPDATE OR DELETE ON audit_auditnode
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();
DROP TRIGGER IF EXISTS audit_checkpoint_append_only ON audit_auditcheckpoint;
CREATE TRIGGER audit_checkpoint_append_only BEFORE UPDATE OR DELETE ON audit_auditcheckpoint
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();
DROP TRIGGER IF EXISTS audit_head_kept ON audit_audithead;
CREATE TRIGGER audit_head_kept BEFORE DELETE ON audit_audithead
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();
""" + "".join(
    f"""
DROP TRIGGER IF EXISTS {t}_no_truncate ON {t};
CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION audit_no_truncate();
"""
    for t in AUDIT_TABLES
)

DROP = (
    "".join(f"DROP TRIGGER IF EXISTS {t}_no_truncate ON {t};\n" for t in AUDIT_TABLES)
    + """
DROP TRIGGER IF EXISTS audit_head_kept ON audit_audithead;
DROP TRIGGER IF EXISTS audit_checkpoint_append_only ON audit_auditcheckpoint;
DROP TRIGGER IF EXISTS audit_node_append_only ON audit_auditnode;
DROP FUNCTION IF EXISTS audit_no_truncate();
"""
)


def backfill_leaves(apps, schema_editor):
    """Leaves, stored nodes and frontier for the events sealed so far (same code as the sealer)."""
    from audit.ledger import event_leaf
    from audit.merkle import frontier_append

    AuditEvent = apps.get_model("audit", "AuditEvent")
    AuditLink = apps.get_model("audit", "AuditLink")
    AuditNode = apps.get_model("audit", "AuditNode")
    AuditHead = apps.get_model("audit", "AuditHead")
    if not AuditLink.objects.exists():
        return
    postgresql = schema_editor.connection.vendor == "postgresql"
    if postgresql:
        schema_editor.execute(
            "ALTER TABLE audit_auditlink DISABLE TRIGGER audit_link_append_only", params=None
        )
    frontier, size = [], 0
    links = list(AuditLink.objects.order_by("seq").values_list("seq", "event_id"))
    for start in range(0, len(links), 2000):
        chunk = links[start : start + 2000]
        events = AuditEvent.objects.in_bulk([event_id for _, event_id in chunk])
        leaves = []
        for seq, event_id in chunk:
            event = events.get(event_id)
            leaf = event_leaf(event, seq) if event is not None else b"\0" * 32  # audit_verify reports it
            AuditLink.objects.filter(seq=seq).update(leaf=leaf.hex())
            leaves.append(leaf)
        frontier, size, nodes = frontier_append(frontier, size, leaves)
        AuditNode.objects.bulk_create([AuditNode(height=h, idx=i, hash=d.hex()) for h, i, d in nodes])
    AuditHead.objects.filter(pk=1).update(frontier=[h.hex() for h in frontier])
    if postgresql:
        schema_editor.execute(
            "ALTER TABLE audit_auditlink ENABLE TRIGGER audit_link_append_only", params=None
        )


def protect(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def unprotect(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0004_sealed_links"),
    ]

    operations = [
        migrations.CreateModel(
            name="AuditCheckpoint",
            fields=[
                ("tree_size", models.BigIntegerField(editable=False, primary_key=True, serialize=False)),
                ("root_hash", models.CharField(editable=False, max_length=64)),
                ("issued_at", models.DateTimeField(editable=False)),
                ("kid", models.CharField(editable=False, max_length=64)),
                ("jws", models.TextField(editable=False)),
            ],
            options={
                "ordering": ["tree_size"],
            },
        ),
        migrations.CreateModel(
            name="AuditNode",
            fields=[
                (
                    "pk",
                    models.CompositePrimaryKey(
                        "height", "idx", blank=True, editable=False, primary_key=True, serialize=False
                    ),
                ),
                ("height", models.SmallIntegerField(editable=False)),
                ("idx", models.BigIntegerField(editable=False)),
                ("hash", models.CharField(editable=False, max_length=64)),
            ],
        ),
        migrations.CreateModel(
            name="AuditReader",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=100, unique=True)),
                ("token_hash", models.CharField(editable=False, max_length=64, unique=True)),
                ("created", models.DateTimeField(auto_now_add=True)),
                ("revoked_at", models.DateTimeField(blank=True, null=True)),
            ],
        ),
        migrations.AddField(
            model_name="audithead",
            name="frontier",
            field=models.JSONField(default=list),
        ),
        migrations.AddField(
            model_name="auditlink",
            name="leaf",
            field=models.CharField(default="", editable=False, max_length=64),
        ),
        migrations.RunPython(backfill_leaves, migrations.RunPython.noop),
        migrations.RunPython(protect, unprotect),
    ]

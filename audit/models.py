"""The append-only, hash-chained audit log.

Each event stores the hash of the event before it and a hash over its own
content plus that link, so editing or deleting any row breaks the chain from
that row on (``manage.py audit_verify``). The application never updates or
deletes a row: ``save`` refuses updates and ``delete`` refuses outright.
"""

from django.conf import settings
from django.db import models


class AuditEvent(models.Model):
    class Outcome(models.TextChoices):
        OK = "ok", "Succeeded"
        REFUSED = "refused", "Refused"

    seq = models.BigIntegerField(unique=True, editable=False)
    occurred_at = models.DateTimeField(editable=False, db_index=True)
    event = models.CharField(max_length=64, db_index=True, editable=False)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, editable=False)
    actor = models.CharField(max_length=200, blank=True, editable=False,
                             help_text="Who acted: user:<pk>, agent:<client_id>, rs:<client_id>, admin:<pk>.")
    # DO_NOTHING: the trail keeps the id of a user who was later deleted (rows are never updated).
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.DO_NOTHING,
                             related_name="+", editable=False, db_constraint=False,
                             help_text="The user whose data or grant this is about.")
    client_id = models.CharField(max_length=100, blank=True, db_index=True, editable=False)
    grant_id = models.CharField(max_length=64, blank=True, db_index=True, editable=False)
    error = models.CharField(max_length=64, blank=True, editable=False)
    detail = models.JSONField(default=dict, editable=False)
    remote_addr = models.CharField(max_length=64, blank=True, editable=False)
    prev_hash = models.CharField(max_length=64, editable=False)
    hash = models.CharField(max_length=64, editable=False)

    class Meta:
        ordering = ["-seq"]
        verbose_name = "audit event"

    def __str__(self) -> str:
        return f"#{self.seq} {self.event} {self.outcome}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise RuntimeError("Audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise RuntimeError("Audit events are append-only")


class AuditHead(models.Model):
    """One row: the last sequence number and hash. Locking it serialises appends."""

    seq = models.BigIntegerField(default=0)
    hash = models.CharField(max_length=64, default="0" * 64)

"""The append-only, hash-chained audit log and its signed Merkle tree (RFC 9162 §2.1).

Writers only ever INSERT an ``AuditEvent``. The sealer (``audit.services.audit_seal``)
links committed events into the chain by INSERTing one ``AuditLink`` per event:
its position, the hash of the link before it, a hash over the event's content
plus that link, and the event's RFC 9162 leaf hash, so editing or deleting any event
or link breaks the chain from there on (``manage.py audit_verify``). Per batch it also
stores the tree's completed subtrees at every ``STRIDE``-th height (``AuditNode``) and
one signed ``AuditCheckpoint``. ``AuditHead`` is the sealer's own state.
The application never updates or deletes an event, link, node or checkpoint: ``save``
refuses updates, ``delete`` refuses outright, and on PostgreSQL triggers refuse UPDATE,
DELETE and TRUNCATE.
"""

from typing import Any, NoReturn

from django.conf import settings
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.expressions import Combinable


class TransactionIdField(models.BigIntegerField[int | Combinable, int]):
    """PostgreSQL's 64-bit transaction id (``xid8``, never wraps); a plain integer elsewhere."""

    db_returning = True  # the value is computed by the database at INSERT and read back by RETURNING

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        return "xid8" if connection.vendor == "postgresql" else super().db_type(connection)

    def from_db_value(self, value: Any, expression: object, connection: BaseDatabaseWrapper) -> int | None:
        return None if value is None else int(value)

    def get_db_prep_value(self, value: Any, connection: BaseDatabaseWrapper, prepared: bool = False) -> Any:
        if hasattr(value, "resolve_expression"):
            return value
        return None if value is None else str(int(value)) if connection.vendor == "postgresql" else int(value)


class AuditEvent(models.Model):
    class Outcome(models.TextChoices):
        OK = "ok", "Succeeded"
        REFUSED = "refused", "Refused"

    occurred_at = models.DateTimeField(editable=False, db_index=True)
    event = models.CharField(max_length=64, db_index=True, editable=False)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, editable=False)
    actor = models.CharField(
        max_length=200,
        blank=True,
        editable=False,
        help_text="Who acted: user:<pk>, agent:<client_id>, rs:<client_id>, admin:<pk>.",
    )
    # DO_NOTHING: the trail keeps the id of a user who was later deleted (rows are never updated).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        related_name="+",
        editable=False,
        db_constraint=False,
        help_text="The user whose data or grant this is about.",
    )
    client_id = models.CharField(max_length=100, blank=True, db_index=True, editable=False)
    grant_id = models.CharField(max_length=64, blank=True, db_index=True, editable=False)
    error = models.CharField(max_length=64, blank=True, editable=False)
    detail = models.JSONField(default=dict, editable=False)
    remote_addr = models.CharField(max_length=64, blank=True, editable=False)
    # The writing transaction (pg_current_xact_id()): the sealer links an event only once every
    # transaction that could still write an earlier one has ended. 0 where there is none (SQLite).
    xid = TransactionIdField(default=0, editable=False)

    class Meta:
        ordering = ["-occurred_at", "-id"]
        indexes = [models.Index(fields=["xid", "id"], name="audit_event_xid_id")]
        verbose_name = "audit event"

    def __str__(self) -> str:
        return f"#{self.pk} {self.event} {self.outcome}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise RuntimeError("Audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("Audit events are append-only")


class AuditLink(models.Model):
    """An event's place in the chain. Written once, by the sealer, never changed."""

    seq = models.BigIntegerField(primary_key=True, editable=False)
    # No foreign-key constraint: that an event behind a link is gone is for audit_verify to report.
    event = models.OneToOneField(
        AuditEvent, on_delete=models.DO_NOTHING, related_name="link", editable=False, db_constraint=False
    )
    prev_hash = models.CharField(max_length=64, editable=False)
    hash = models.CharField(max_length=64, editable=False)
    # RFC 9162 §2.1.1 leaf hash (hex) of the event's canonical form: leaf seq - 1 of the tree.
    leaf = models.CharField(max_length=64, editable=False, default="")
    sealed_at = models.DateTimeField(editable=False)

    class Meta:
        ordering = ["seq"]

    def __str__(self) -> str:
        return f"#{self.seq} -> event {self.event_id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Audit links are written by the sealer only (bulk INSERT)")

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("Audit links are append-only")


class AuditHead(models.Model):
    """One row, written only by the sealer while it holds the sealer lock.

    ``seq``/``hash``: the newest link, so removing the newest links is detected.
    ``frontier``: the tree's perfect subtrees, largest first (hex), so a batch extends the
    tree without reading it (``audit.merkle``).
    ``floor``: every event written by a transaction below it is linked (where the
    next search starts). ``lag_*``: the cumulative seal-lag histogram (now minus
    ``occurred_at`` when linked) that ``/metrics`` reports, whichever node sealed.
    """

    seq = models.BigIntegerField(default=0)
    hash = models.CharField(max_length=64, default="0" * 64)
    floor = TransactionIdField(default=0)
    sealed_at = models.DateTimeField(null=True)
    lag_buckets = models.JSONField(default=list)
    lag_sum = models.FloatField(default=0.0)
    lag_count = models.BigIntegerField(default=0)
    frontier = models.JSONField(default=list)


class AuditNode(models.Model):
    """A perfect subtree of the ledger's tree: ``height`` a multiple of ``audit.merkle.STRIDE``,
    covering leaves ``idx * 2**height`` to ``(idx + 1) * 2**height - 1``. Written once, by the sealer."""

    pk = models.CompositePrimaryKey("height", "idx")
    height = models.SmallIntegerField(editable=False)
    idx = models.BigIntegerField(editable=False)
    hash = models.CharField(max_length=64, editable=False)

    def save(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Tree nodes are written by the sealer only")

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("Tree nodes are append-only")


class AuditCheckpoint(models.Model):
    """A signed tree head: the sealer's statement that the first ``tree_size`` events have root
    ``root_hash``, a compact JWS (``countersign.ledger``) by the server's signing key ``kid``."""

    tree_size = models.BigIntegerField(primary_key=True, editable=False)
    root_hash = models.CharField(max_length=64, editable=False)
    issued_at = models.DateTimeField(editable=False)
    kid = models.CharField(max_length=64, editable=False)
    jws = models.TextField(editable=False)

    class Meta:
        ordering = ["tree_size"]

    def __str__(self) -> str:
        return f"checkpoint {self.tree_size} {self.root_hash[:12]}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise RuntimeError("Checkpoints are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("Checkpoints are append-only")


class AuditReader(models.Model):
    """An admin-issued credential for pulling the audit log (``/audit/events/``): a log shipper or
    SIEM. Only the SHA-256 of its token is kept; revoking sets ``revoked_at``."""

    name = models.CharField(max_length=100, unique=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name

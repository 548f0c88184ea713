from typing import TypeVar

from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from .models import AuditCheckpoint, AuditEvent, AuditReader

M = TypeVar("M", bound=Model)


class ReadOnlyAdmin(admin.ModelAdmin[M]):
    """For records only services write: the admin shows them, never edits them."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: M | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: M | None = None) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin[AuditEvent]):
    """Read-only: the application never edits the trail, and neither does the admin."""

    list_display = (
        "id",
        "chain_position",
        "occurred_at",
        "event",
        "outcome",
        "actor",
        "user",
        "client_id",
        "error",
    )
    list_filter = ("outcome", "event")
    search_fields = ("event", "actor", "client_id", "grant_id", "error")
    date_hierarchy = "occurred_at"
    readonly_fields = [f.name for f in AuditEvent._meta.fields] + ["chain_position"]
    ordering = ("-occurred_at", "-id")  # the newest events may not be sealed yet

    def get_queryset(self, request: HttpRequest) -> QuerySet[AuditEvent]:
        return super().get_queryset(request).select_related("link")

    @admin.display(description="seq")
    def chain_position(self, obj: AuditEvent) -> int | str:
        link = getattr(obj, "link", None)  # a missing reverse one-to-one raises an AttributeError
        return link.seq if link is not None else "not sealed yet"


@admin.register(AuditCheckpoint)
class AuditCheckpointAdmin(ReadOnlyAdmin[AuditCheckpoint]):
    """The signed tree heads, oldest first (docs/audit.md); written by the sealer only."""

    list_display = ("tree_size", "root_hash", "issued_at", "kid")
    readonly_fields = [f.name for f in AuditCheckpoint._meta.fields]
    ordering = ("-tree_size",)


@admin.register(AuditReader)
class AuditReaderAdmin(ReadOnlyAdmin[AuditReader]):
    """Tokens for pulling the audit log: issued and revoked with ``manage.py audit_reader``."""

    list_display = ("name", "created", "revoked_at")
    readonly_fields = ("name", "created", "revoked_at")

from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest

from audit.admin import ReadOnlyAdmin

from .models import ActionToken, ApprovalRequest, ApprovalVote


class ApprovalVoteInline(admin.TabularInline):
    """Two-person approval: each approver's answer, as written by ``approvals.votes`` (read-only)."""

    model = ApprovalVote
    extra = 0
    can_delete = False
    readonly_fields = ("user", "decision", "decided_at", "auth")
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ReadOnlyAdmin):
    list_display = ("headline", "user", "agent", "scope", "status", "delivery_mode", "created", "expires_at",
                    "decision_method")
    list_filter = ("status", "delivery_mode", "scope", "agent")
    search_fields = ("id", "headline", "user__username", "agent__name", "action_hash")
    readonly_fields = [f.name for f in ApprovalRequest._meta.fields if f.name != "client_notification_token"]
    exclude = ("client_notification_token",)
    inlines = [ApprovalVoteInline]



@admin.register(ActionToken)
class ActionTokenAdmin(ReadOnlyAdmin):
    list_display = ("jti", "approval", "issued_at", "expires_at", "redeemed_at", "redeemed_by")
    list_filter = ("redeemed_by",)
    readonly_fields = [f.name for f in ActionToken._meta.fields]


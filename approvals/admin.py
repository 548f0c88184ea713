from django.contrib import admin

from audit.admin import ReadOnlyAdmin

from .models import ActionToken, ApprovalRequest


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ReadOnlyAdmin[ApprovalRequest]):
    list_display = (
        "headline",
        "user",
        "agent",
        "scope",
        "status",
        "delivery_mode",
        "created",
        "expires_at",
        "decision_method",
    )
    list_filter = ("status", "delivery_mode", "scope", "agent")
    search_fields = ("id", "headline", "user__username", "agent__name", "action_hash")
    readonly_fields = [f.name for f in ApprovalRequest._meta.fields if f.name != "client_notification_token"]
    exclude = ("client_notification_token",)


@admin.register(ActionToken)
class ActionTokenAdmin(ReadOnlyAdmin[ActionToken]):
    list_display = ("jti", "approval", "issued_at", "expires_at", "redeemed_at", "redeemed_by")
    list_filter = ("redeemed_by",)
    readonly_fields = [f.name for f in ActionToken._meta.fields]

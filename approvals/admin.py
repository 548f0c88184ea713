from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest

from audit.admin import ReadOnlyAdmin

from .models import ActionToken, ApprovalRequest, ApprovalVote


class ApprovalVoteInline(admin.TabularInline[ApprovalVote, ApprovalRequest]):
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
    inlines = [ApprovalVoteInline]


@admin.register(ActionToken)
class ActionTokenAdmin(ReadOnlyAdmin[ActionToken]):
    list_display = ("jti", "approval", "issued_at", "expires_at", "redeemed_at", "redeemed_by")
    list_filter = ("redeemed_by",)
    readonly_fields = [f.name for f in ActionToken._meta.fields]


# --- the delivery channels (approvals.notify) -------------------------------------------------------

from django.contrib import messages  # noqa: E402
from django.http import HttpRequest  # noqa: E402

from .notify.models import OrganisationWebhook, PromptDelivery, PushSubscription  # noqa: E402
from .notify.webhooks import webhook_secret_new  # noqa: E402


@admin.register(OrganisationWebhook)
class OrganisationWebhookAdmin(admin.ModelAdmin[OrganisationWebhook]):
    """Admins configure where an organisation's prompts are announced; the secret is shown once."""

    list_display = ("name", "url", "group", "active", "created")
    list_filter = ("active", "group")
    fields = ("name", "url", "group", "active")

    def save_model(self, request: HttpRequest, obj: OrganisationWebhook, form: object, change: bool) -> None:
        if not change:
            obj.secret = webhook_secret_new()
            messages.warning(
                request, f"Signing secret for {obj.name} (shown once; give it to the receiver): {obj.secret}"
            )
        super().save_model(request, obj, form, change)


@admin.register(PushSubscription)
class PushSubscriptionAdmin(ReadOnlyAdmin[PushSubscription]):
    list_display = ("user", "label", "created", "last_delivered_at")
    readonly_fields = ("user", "label", "created", "last_delivered_at")
    exclude = ("endpoint", "endpoint_hash", "p256dh", "auth")

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return True  # an admin may take a lost device off an account


@admin.register(PromptDelivery)
class PromptDeliveryAdmin(ReadOnlyAdmin[PromptDelivery]):
    list_display = ("approval", "channel", "outcome", "target", "error", "at")
    list_filter = ("channel", "outcome")
    readonly_fields = [f.name for f in PromptDelivery._meta.fields]

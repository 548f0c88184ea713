"""What the browser inbox receives: prompt payloads and the user's websocket group.

Groups are named from the server-side user id only, never from client input.
"""

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from .models import ApprovalRequest


def user_group(user_id: Any) -> str:
    return f"approvals.user.{int(user_id)}"


def prompt_payload(approval: ApprovalRequest) -> dict[str, Any]:
    """Everything the inbox shows. Agent text is sent as text; the page inserts it with textContent."""
    return {
        "id": str(approval.pk),
        "agent": approval.agent.name,
        "publisher": approval.agent.publisher,
        "scope": approval.scope,
        "headline": approval.headline,
        "authorization_details": approval.authorization_details,
        "binding_message": approval.binding_message,
        "created": approval.created.isoformat(),
        "expires_at": approval.expires_at.isoformat(),
        "expires_in": max(0, int((approval.expires_at - timezone.now()).total_seconds())),
    }


def pending_prompts(*, user_id: int) -> list[dict[str, Any]]:
    rows = (ApprovalRequest.objects.select_related("agent")
            .filter(user_id=user_id, status=ApprovalRequest.Status.PENDING, expires_at__gt=timezone.now())
            .order_by("created"))
    return [prompt_payload(a) for a in rows]


def send_to_user(user_id: Any, message: dict[str, Any]) -> None:
    async_to_sync(get_channel_layer().group_send)(user_group(user_id), message)

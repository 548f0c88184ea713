"""What each channel says about a prompt: the server-written headline and a link to the prompt.

Never a token, an ``auth_req_id`` or a one-click approval: the link opens the inbox, where
deciding needs the signed-in session (and fresh authentication where the scope's policy asks).
"""

from typing import Any

from django.core.mail import EmailMessage

from consent.conf import countersign_settings

from ..models import ApprovalRequest

TITLE = "{agent} asks for your approval"


def prompt_path(approval: ApprovalRequest, via: str) -> str:
    return f"/approvals/{approval.pk}/?via={via}"


def prompt_url(approval: ApprovalRequest, via: str) -> str:
    return str(countersign_settings.ISSUER).rstrip("/") + prompt_path(approval, via)


def push_payload(approval: ApprovalRequest) -> dict[str, Any]:
    """The decrypted body the service worker reads (static/countersign/sw.js)."""
    return {
        "id": str(approval.pk),
        "title": TITLE.format(agent=approval.agent.name),
        "body": approval.headline,
        "url": prompt_path(approval, "push"),
        "expires_at": approval.expires_at.isoformat(),
    }


def email_message(approval: ApprovalRequest, to: str) -> EmailMessage:
    link = prompt_url(approval, "email")
    body = (
        f"{approval.agent.name} asks for your approval:\n\n    {approval.headline}\n\n"
        f"Open the request to approve or deny it (you will be asked to sign in):\n{link}\n\n"
        f"It expires at {approval.expires_at:%Y-%m-%d %H:%M %Z}. Nothing happens until you decide; "
        f"this message cannot approve anything by itself.\n"
    )
    return EmailMessage(subject=f"Approval needed: {approval.headline}"[:200], body=body, to=[to])


def webhook_data(approval: ApprovalRequest) -> dict[str, Any]:
    return {
        "approval_id": str(approval.pk),
        "user": f"user:{approval.user_id}",
        "agent": approval.agent.name,
        "scope": approval.scope,
        "headline": approval.headline,
        "url": prompt_url(approval, "webhook"),
        "expires_at": approval.expires_at.isoformat(),
    }

from typing import Any

from django.http import HttpRequest

from .quorum import pending_for_approver
from .selectors import pending_count


def approvals_badge(request: HttpRequest) -> dict[str, Any]:
    """The pending-approvals count shown in the header of every signed-in page: the person's own
    prompts, and other people's they may vote on (two-person approval)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"pending_approvals": pending_count(user=user) + len(pending_for_approver(user_id=user.pk))}

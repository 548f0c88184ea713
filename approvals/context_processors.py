from django.http import HttpRequest

from .selectors import pending_count


def approvals_badge(request: HttpRequest) -> dict[str, int]:
    """The pending-approvals count shown in the header of every signed-in page."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"pending_approvals": pending_count(user=user)}

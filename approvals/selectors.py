from django.db.models import QuerySet
from django.utils import timezone

from .models import ApprovalRequest


def pending_for_user(*, user) -> QuerySet[ApprovalRequest]:
    return (ApprovalRequest.objects.select_related("agent")
            .filter(user=user, status=ApprovalRequest.Status.PENDING, expires_at__gt=timezone.now())
            .order_by("created"))


def history_for_user(*, user, limit: int = 50) -> QuerySet[ApprovalRequest]:
    return (ApprovalRequest.objects.select_related("agent", "decided_by")
            .filter(user=user).exclude(status=ApprovalRequest.Status.PENDING, expires_at__gt=timezone.now())
            .order_by("-created")[:limit])


def pending_count(*, user) -> int:
    return pending_for_user(user=user).count()

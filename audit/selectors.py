from django.db.models import QuerySet

from .models import AuditEvent


def audit_events_for_user(*, user_id: int, limit: int = 200) -> QuerySet[AuditEvent]:
    # Not by chain position: the newest events may not be sealed yet.
    return AuditEvent.objects.filter(user_id=user_id).order_by("-occurred_at", "-id")[:limit]

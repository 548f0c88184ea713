from django.db.models import QuerySet

from .models import AuditEvent


def audit_events_for_user(*, user_id: int, limit: int = 200) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(user_id=user_id).order_by("-seq")[:limit]

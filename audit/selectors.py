from django.db.models import Q, QuerySet

from .models import AuditEvent

OUTCOMES = ("ok", "refused")
PERIODS = {"day": "Last 24 hours", "week": "Last 7 days", "month": "Last 30 days", "": "All time"}


def audit_events_for_user(*, user_id: int, limit: int = 200, client_id: str = "", outcome: str = "",
                          where: Q | None = None) -> QuerySet[AuditEvent]:
    # Not by chain position: the newest events may not be sealed yet.
    events = AuditEvent.objects.filter(user_id=user_id)
    if client_id:
        events = events.filter(client_id=client_id)
    if outcome in OUTCOMES:
        events = events.filter(outcome=outcome)
    if where is not None:
        events = events.filter(where)
    return events.order_by("-occurred_at", "-id")[:limit]

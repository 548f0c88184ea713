from datetime import datetime

from django.db import connection
from django.db.models import Q, QuerySet

from .models import AuditEvent, AuditHead
from .services import SEAL_LAG_BUCKETS

OUTCOMES = ("ok", "refused")
PERIODS = {"day": "Last 24 hours", "week": "Last 7 days", "month": "Last 30 days", "": "All time"}


def audit_events_for_user(
    *, user_id: int, limit: int = 200, client_id: str = "", outcome: str = "", where: Q | None = None
) -> QuerySet[AuditEvent]:
    # Not by chain position: the newest events may not be sealed yet.
    events = AuditEvent.objects.filter(user_id=user_id)
    if client_id:
        events = events.filter(client_id=client_id)
    if outcome in OUTCOMES:
        events = events.filter(outcome=outcome)
    if where is not None:
        events = events.filter(where)
    return events.order_by("-occurred_at", "-id")[:limit]


# --- the sealer's progress ------------------------------------------------------------------------


def _unlinked(*, recent: bool) -> QuerySet[AuditEvent]:
    """Unlinked events: ``recent`` ones (at or above the floor: not sealed yet), or the others
    (below it: they were linked once, and their link is gone)."""
    head = AuditHead.objects.filter(pk=1).first()
    unlinked = AuditEvent.objects.filter(link__isnull=True)
    if connection.vendor != "postgresql":
        # SQLite links every event in its own transaction: an unlinked event has lost its link.
        return unlinked.none() if recent else unlinked
    floor = head.floor if head is not None else 0
    return unlinked.filter(xid__gte=floor) if recent else unlinked.filter(xid__lt=floor)


def audit_unsealed_count() -> int:
    count: int = _unlinked(recent=True).count()
    return count


def audit_oldest_unsealed() -> datetime | None:
    """When the oldest event still waiting for the sealer happened (None: nothing waits)."""
    first = _unlinked(recent=True).order_by("occurred_at").values_list("occurred_at", flat=True).first()
    return first


def audit_seal_lag() -> tuple[list[int], float, int]:
    """The seal-lag histogram: (count per bucket of ``SEAL_LAG_BUCKETS``, sum of seconds, count)."""
    head = AuditHead.objects.filter(pk=1).first()
    if head is None or not head.lag_buckets:
        return [0] * len(SEAL_LAG_BUCKETS), 0.0, 0
    return list(head.lag_buckets), head.lag_sum, head.lag_count

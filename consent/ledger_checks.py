"""What ``audit_verify`` checks of consent's own records (registered in ``ConsentConfig.ready``)."""

from collections.abc import Iterator

from audit.models import AuditEvent
from audit.verification import ChainBreak

from .models import SessionGrant


def grants_without_consent(newest: int = 1000) -> Iterator[ChainBreak]:
    """Every session grant is written with its ``consent.given`` event in one transaction: a grant
    whose event is gone means events were removed, even when no checkpoint was kept."""
    ids = [str(pk) for pk in SessionGrant.objects.order_by("-created").values_list("pk", flat=True)[:newest]]
    if not ids:
        return
    seen = set(
        AuditEvent.objects.filter(event="consent.given", grant_id__in=ids).values_list("grant_id", flat=True)
    )
    missing = [pk for pk in ids if pk not in seen]
    if missing:
        yield ChainBreak(
            None,
            f"{len(missing)} session grant(s) have no consent.given event (e.g. grant "
            f"{missing[0]}): audit events were removed",
        )

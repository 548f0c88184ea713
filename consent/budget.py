"""A budget: what a user lets one agent spend on one step-up scope of one session grant without a
prompt, "up to 500.00 USD each, 2,000.00 USD a week" (a consent record; its services are
``consent.budgets``, the reservations against it ``approvals.budgets``).

``used`` is what was reserved or spent in the period that began at ``period_start``; only the
reservation and refund statements change it, each one conditional UPDATE whose row count decides.
Periods are calendar windows in UTC (a day from midnight, a week from Monday, a month from the
1st): the first reservation of a new period resets ``used`` in the same statement.
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db import models
from django.utils import timezone

# Every amount: 18 digits, 4 of them after the point (NUMERIC(18, 4)).
AMOUNT_DIGITS, AMOUNT_PLACES = 18, 4


def period_start(period: str, at: datetime) -> datetime:
    """The start of the calendar ``period`` (day, week, month; UTC) that ``at`` falls in."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown budget period {period!r}")


def period_end(period: str, start: datetime) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def plain(amount: Decimal) -> str:
    """ "2000.00": two decimals unless the amount needs more (as a form field shows it)."""
    exponent = amount.normalize().as_tuple().exponent
    places = min(4, max(2, -exponent if isinstance(exponent, int) else 2))
    return f"{amount:.{places}f}"


def money(amount: Decimal, currency: str) -> str:
    """ "2,000.00 USD"."""
    text = plain(amount)
    whole, _, fraction = text.partition(".")
    return f"{int(whole):,}.{fraction} {currency}"


class Budget(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        ENDED = "ended", "Ended"

    class Period(models.TextChoices):
        DAY = "day", "a day"
        WEEK = "week", "a week"
        MONTH = "month", "a month"

    grant = models.ForeignKey("consent.SessionGrant", on_delete=models.CASCADE, related_name="budgets")
    scope = models.CharField(max_length=100)
    currency = models.CharField(max_length=3)
    per_action = models.DecimalField(
        "ceiling per action", max_digits=AMOUNT_DIGITS, decimal_places=AMOUNT_PLACES
    )
    total = models.DecimalField("total per period", max_digits=AMOUNT_DIGITS, decimal_places=AMOUNT_PLACES)
    period = models.CharField(max_length=8, choices=Period.choices)
    period_start = models.DateTimeField()
    used = models.DecimalField(
        "reserved or spent this period",
        default=Decimal(0),
        max_digits=AMOUNT_DIGITS,
        decimal_places=AMOUNT_PLACES,
    )
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.ACTIVE)
    created = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["scope"]
        constraints = [
            models.UniqueConstraint(
                fields=["grant", "scope"],
                condition=models.Q(status="active"),
                name="one_active_budget_per_scope",
            ),
            models.CheckConstraint(
                condition=models.Q(per_action__gt=0, total__gt=0, used__gte=0), name="budget_amounts_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scope}: {self.describe()} ({self.status})"

    def describe(self) -> str:
        return (
            f"up to {money(self.per_action, self.currency)} each, "
            f"{money(self.total, self.currency)} {self.get_period_display()}"
        )

    def used_now(self, at: datetime | None = None) -> Decimal:
        """What counts against this period: nothing yet if the stored period is over."""
        current = period_start(self.period, at or timezone.now())
        return self.used if self.period_start >= current else Decimal(0)

    def left(self, at: datetime | None = None) -> Decimal:
        return max(Decimal(0), self.total - self.used_now(at))

    def resets_at(self, at: datetime | None = None) -> datetime:
        return period_end(self.period, period_start(self.period, at or timezone.now()))

    # For the pages: what /grants/ says of it, and the lowering form's current values.
    @property
    def left_text(self) -> str:
        return money(self.left(), self.currency)

    @property
    def summary(self) -> str:
        noun = {"day": "today", "week": "this week", "month": "this month"}[self.period]
        return (
            f"{money(self.left(), self.currency)} left of {money(self.total, self.currency)} {noun};"
            f" up to {money(self.per_action, self.currency)} each"
        )

    @property
    def per_action_plain(self) -> str:
        return plain(self.per_action)

    @property
    def total_plain(self) -> str:
        return plain(self.total)

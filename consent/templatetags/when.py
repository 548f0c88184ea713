"""``{% when t %}``: an absolute time in the person's time zone, with how long ago as a hint.

The time zone is the one the browser reported (``config.timezone``); until it has, times say
"UTC". static/countersign/localtime.js rewrites them to the browser's zone and keeps the hint
current.
"""

from datetime import datetime, timedelta

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()


def relative(t: datetime, now: datetime | None = None) -> str:
    """ "just now", "4 min ago", "in 3 min", "2 h ago", "3 days ago"."""
    seconds = int(((now or timezone.now()) - t).total_seconds())
    future, seconds = seconds < 0, abs(seconds)
    if seconds < 60:
        return "just now" if not future else "in a moment"
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= size:
            n = seconds // size
            text = f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return ""  # unreachable


@register.filter
def duration(span: timedelta) -> str:
    """A timedelta in words: "1 hour", "8 hours", "30 minutes", "7 days"."""
    seconds = int(span.total_seconds())
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size and seconds % size == 0 or seconds >= size * 2:
            n = round(seconds / size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"


@register.simple_tag
def when(t: datetime | None) -> str:
    if t is None:
        return ""
    local = timezone.localtime(t)
    zone = timezone.get_current_timezone_name()
    return format_html(
        '<time datetime="{}" data-local>{}</time> <span class="ago muted">({})</span>',
        t.isoformat(),
        local.strftime("%-d %b %Y, %H:%M") + ("" if zone != "UTC" else " UTC"),
        relative(t),
    )

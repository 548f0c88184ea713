"""Show times in the person's own time zone: the browser reports it in a ``tz`` cookie
(static/countersign/localtime.js); an unknown or missing zone leaves UTC."""

import zoneinfo
from collections.abc import Callable
from functools import lru_cache

from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils import timezone


@lru_cache(maxsize=64)
def _zone(name: str) -> zoneinfo.ZoneInfo | None:
    if len(name) > 64 or name not in zoneinfo.available_timezones():
        return None
    return zoneinfo.ZoneInfo(name)


class TimezoneMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        name = request.COOKIES.get("tz")
        zone = _zone(name) if name else None
        if zone is None:
            return self.get_response(request)
        timezone.activate(zone)
        try:
            return self.get_response(request)
        finally:
            timezone.deactivate()

"""Middleware of our own.

``DependencyDownMiddleware``: when a dependency is down, answer 503 cleanly instead of a 500.
PostgreSQL unreachable: protocol endpoints answer the OAuth error
``temporarily_unavailable`` (RFC 6749 §4.1.2.1) as JSON; people get a plain page.
Every write happens in a transaction, so nothing is left half-written.

``MessageMiddleware``: Django's flash messages, for pages people see only.
"""

import logging

from django.contrib.messages.middleware import MessageMiddleware as DjangoMessageMiddleware
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse

log = logging.getLogger(__name__)
PROTOCOL_PREFIXES = ("/o/", "/.well-known/", "/audit/", "/readyz", "/metrics")
# Answered to programs, never rendered for a person: no page here shows or adds a flash message.
# /o/authorize/ is the consent page (base.html shows messages), so it keeps them.
MACHINE_PREFIXES = ("/o/", "/.well-known/", "/audit/", "/healthz", "/readyz", "/metrics")
PAGES_UNDER_MACHINE_PREFIXES = ("/o/authorize/",)


def is_machine_path(path: str) -> bool:
    return path.startswith(MACHINE_PREFIXES) and not path.startswith(PAGES_UNDER_MACHINE_PREFIXES)


class MessageMiddleware(DjangoMessageMiddleware):
    """Django's MessageMiddleware, skipped where no message is ever read or added.

    Building the message storage costs a cookie signer and two storage objects on every request
    (~0.1 ms, a third of a trivial request under WSGI); token, introspection, CIBA, redemption,
    metadata and health requests never use it. Messages queued for a page stay queued across
    those requests, as before (the storage only writes back what was read or added).
    """

    def process_request(self, request):
        if not is_machine_path(request.path):
            super().process_request(request)


class DependencyDownMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        log.error("database unavailable: %s", type(exception).__name__)
        headers = {"Retry-After": "5", "Cache-Control": "no-store"}
        if request.path.startswith(PROTOCOL_PREFIXES):
            return JsonResponse({"error": "temporarily_unavailable",
                                 "error_description": "The service is briefly unavailable; retry shortly."},
                                status=503, headers=headers)
        return HttpResponse("<!doctype html><title>Countersign is briefly unavailable</title>"
                            "<h1>Countersign is briefly unavailable</h1><p>Please try again in a moment. "
                            "Nothing you did was half-saved.</p>", status=503, headers=headers)

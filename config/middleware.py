"""When a dependency is down, answer 503 cleanly instead of a 500.

PostgreSQL unreachable: protocol endpoints answer the OAuth error
``temporarily_unavailable`` (RFC 6749 §4.1.2.1) as JSON; people get a plain page.
Every write happens in a transaction, so nothing is left half-written.
"""

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse

log = logging.getLogger(__name__)
PROTOCOL_PREFIXES = ("/o/", "/.well-known/", "/readyz", "/metrics")


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

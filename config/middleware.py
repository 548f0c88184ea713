"""Middleware of our own.

``DependencyDownMiddleware``: when a dependency is down, answer 503 cleanly instead of a 500.
PostgreSQL unreachable: protocol endpoints answer the OAuth error
``temporarily_unavailable`` (RFC 6749 §4.1.2.1) as JSON; people get a plain page.
Every write happens in a transaction, so nothing is left half-written.

``MessageMiddleware``: Django's flash messages, for pages people see only.
"""

import logging
from collections.abc import Callable
from typing import cast

from django.conf import settings
from django.contrib.messages.middleware import MessageMiddleware as DjangoMessageMiddleware
from django.core.handlers.exception import convert_exception_to_response
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from config.logging import RequestContextMiddleware
from consent.errors import ServiceUnavailable
from consent.http import error_response
from consent.limits.middleware import RateLimitMiddleware

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

    def process_request(self, request: HttpRequest) -> None:
        if not is_machine_path(request.path):
            super().process_request(request)


class DependencyDownMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        log.error("database unavailable: %s", type(exception).__name__)
        headers = {"Retry-After": "5", "Cache-Control": "no-store"}
        if request.path.startswith(PROTOCOL_PREFIXES):
            return error_response(
                ServiceUnavailable("The service is briefly unavailable; retry shortly."), headers=headers
            )
        return HttpResponse(
            "<!doctype html><title>Countersign is briefly unavailable</title>"
            "<h1>Countersign is briefly unavailable</h1><p>Please try again in a moment. "
            "Nothing you did was half-saved.</p>",
            status=503,
            headers=headers,
        )


# POST-only protocol endpoints that never read a session, a cookie or the signed-in user: agents
# and resource servers authenticate in the request itself (RFC 6749 §2.3, RFC 7662 §2.1).
LANE_PATHS = ("/o/token/", "/o/bc-authorize/", "/o/redeem/", "/o/introspect/", "/o/revoke/")


def lane_handlers(
    get_response: Callable[[HttpRequest], HttpResponseBase],
) -> dict[str, Callable[[HttpRequest], HttpResponseBase]]:
    """path -> the request's whole handling on the lane: rate limits, request id, 503, the view.

    ``get_response`` is only the 503 handler's fallback; the views come from the URLconf, once.
    """
    from django.urls import resolve  # the URLconf imports the views: not at module load

    down = DependencyDownMiddleware(get_response)
    # WSGI: the chain below is synchronous, so each lane answers with a response, never an awaitable.
    lanes: dict[str, Callable[[HttpRequest], HttpResponseBase]] = {}
    for path in LANE_PATHS:
        view = resolve(path).func

        def answer(request: HttpRequest, view: Callable[..., HttpResponseBase] = view) -> HttpResponseBase:
            try:
                return view(request)
            except Exception as exc:
                response = down.process_exception(request, exc)
                if response is None:
                    raise
                return response

        inner = convert_exception_to_response(answer)
        inner = convert_exception_to_response(
            RequestContextMiddleware(cast(Callable[[HttpRequest], HttpResponseBase], inner))
        )
        lanes[path] = cast(
            Callable[[HttpRequest], HttpResponseBase],
            convert_exception_to_response(
                RateLimitMiddleware(cast(Callable[[HttpRequest], HttpResponseBase], inner))
            ),
        )
    return lanes


def finish_lane_response(response: HttpResponseBase) -> HttpResponseBase:
    """Add what the skipped middleware would: ``Content-Length`` (CommonMiddleware) and
    ``X-Frame-Options`` (XFrameOptionsMiddleware)."""
    if not response.streaming and "Content-Length" not in response:
        response.headers["Content-Length"] = str(len(cast(HttpResponse, response).content))
    response.headers.setdefault("X-Frame-Options", settings.X_FRAME_OPTIONS)
    return response


class ProtocolLaneMiddleware:
    """Serve the protocol endpoints through the middleware they need, and no other.

    Placed right after ``SecurityMiddleware``. A POST to one of ``LANE_PATHS`` runs only what
    applies to it — the rate and attempt limits, the request id, the 503 for a database outage,
    the view — and skips static files, sessions, CSRF (these views are exempt), authentication,
    OTP, messages and the sign-in lockout, none of which such a request touches, and the URL
    resolver (each path maps to one view, looked up in the URLconf once): measured in-process
    (``bench/inprocess.py``), 6-14% of a token request's CPU. Every other request goes down the full chain.

    The answer is the same either way (``tests/ops/test_protocol_lane.py`` compares them): the
    skipped middleware add nothing to these responses but ``X-Frame-Options``, set here as
    ``XFrameOptionsMiddleware`` would, and ``Content-Length``, as ``CommonMiddleware`` would.
    An exception in the view becomes a response as Django's handler makes it
    (``convert_exception_to_response``), so the limits and the request id still see it.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.lanes = lane_handlers(get_response)

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        lane = self.lanes.get(request.path_info) if request.method == "POST" else None
        if lane is None:
            return self.get_response(request)
        return finish_lane_response(lane(request))

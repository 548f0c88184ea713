"""Structured logs: one JSON object a line, with the request id, user, agent and grant where known.

Never a token, secret or ``auth_req_id``: those never reach a log call, and the
formatter only copies the fields listed here.
"""

import json
import logging
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest
from django.http.response import HttpResponseBase

from audit.signals import event_built

log_context: ContextVar[dict[str, str] | None] = ContextVar("countersign_log_context", default=None)
FIELDS = ("request_id", "user_id", "client_id", "grant_id")


def bind(**fields: object) -> None:
    """Add what is known about the current request (ids only) to its log lines."""
    current = dict(log_context.get() or {})
    current.update({k: str(v) for k, v in fields.items() if v not in (None, "") and k in FIELDS})
    log_context.set(current)


_base_factory = logging.getLogRecordFactory()


def _record_with_context(*args: Any, **kwargs: Any) -> logging.LogRecord:
    # Captured when the line is logged: a handler may format it later, in another context.
    record = _base_factory(*args, **kwargs)
    record.countersign = dict(log_context.get() or {})
    return record


logging.setLogRecordFactory(_record_with_context)


def _bind_audited_ids(
    sender: object, *, user_id: object = None, client_id: str = "", grant_id: object = "", **kwargs: object
) -> None:
    bind(user_id=user_id, client_id=client_id, grant_id=grant_id)


# Connected when logging is configured (settings.LOGGING names JsonFormatter, in every process).
event_built.connect(_bind_audited_ids, dispatch_uid="config.logging.bind_audited_ids")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "countersign", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-ID`` from the proxy, or a new one) and echoes it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = (
            incoming
            if 8 <= len(incoming) <= 64 and incoming.isascii() and incoming.isprintable()
            else uuid.uuid4().hex
        )
        # Not reset on the way out: Django logs the response (django.request) after the middleware
        # chain returns. Each request starts from a fresh dict, so nothing carries over.
        log_context.set({"request_id": request_id})
        response = self.get_response(request)
        # Only after the view: reading the user loads the session, and a database outage must
        # surface inside the view (where it becomes a 503), not here.
        user = getattr(request, "_cached_user", None)
        if user is not None and user.is_authenticated:
            bind(user_id=user.pk)
        response["X-Request-ID"] = request_id
        return response

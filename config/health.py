"""Liveness, readiness and metrics for operators.

``/healthz``: the process answers. ``/readyz``: the database, the Redis channel
layer and the Celery broker are all reachable, and the audit sealer keeps up (503
with a JSON body naming what is down). ``/metrics``: Prometheus text format, for the monitoring system only
(a bearer token from ``METRICS_TOKEN``, or loopback when none is set).
"""

import hmac
import os
import time
from typing import cast

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from approvals.metrics import websocket_connections

from .metrics import DatabaseCollector, LimitsCollector


def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured (CHANNEL_LAYERS)")
    async_to_sync(layer.group_send)("countersign.readiness", {"type": "readiness.ping"})


def _broker() -> None:
    from config.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _audit_sealer() -> None:
    """The oldest event still waiting for its link: older than this, the sealer has stopped (or a
    transaction left open on the database holds it back)."""
    from audit.selectors import audit_oldest_unsealed

    # Seconds (a number), read beside the validated COUNTERSIGN keys.
    stale_after = cast(float, settings.COUNTERSIGN.get("AUDIT_SEALER_STALE_SECONDS", 30))
    oldest = audit_oldest_unsealed()
    if oldest is not None and (waited := (timezone.now() - oldest).total_seconds()) > stale_after:
        raise RuntimeError(
            f"audit sealer: an event has waited {waited:.0f}s to be sealed "
            f"(is `manage.py audit_seal --loop` running?)"
        )


CHECKS = {
    "database": _database,
    "channel_layer": _channel_layer,
    "broker": _broker,
    "audit_sealer": _audit_sealer,
}


def readyz(request: HttpRequest) -> HttpResponse:
    results, ok = {}, True
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
            results[name] = {"status": "ok", "ms": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:  # any failure means not ready; say which and why
            ok = False
            results[name] = {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:200]}
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", "checks": results},
        status=200 if ok else 503,
        headers={"Cache-Control": "no-store"},
    )


def _metrics_allowed(request: HttpRequest) -> bool:
    token = os.environ.get("METRICS_TOKEN", "")
    if token:
        given = request.META.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given, token)
    return request.META.get("REMOTE_ADDR") in ("127.0.0.1", "::1")


def metrics(request: HttpRequest) -> HttpResponse:
    if not _metrics_allowed(request):
        return JsonResponse({"error": "forbidden"}, status=403)
    registry = CollectorRegistry()
    registry.register(DatabaseCollector())
    registry.register(LimitsCollector())
    registry.register(websocket_connections)
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

"""Prometheus metrics.

Counts come from the database at scrape time (the audit trail and approval rows
are the source of truth, whichever process did the work), so several ASGI
processes and Celery workers need no shared metrics state. Live websocket
connections are per process.
"""

from collections.abc import Iterator
from datetime import timedelta

from django.db.models import Count
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

TOKEN_EVENTS = {
    "token.issued": "session",
    "token.refreshed": "refresh",
    "token.exchanged": "exchange",
    "token.delegated": "delegation",
    "action_token.issued": "action",
}


class DatabaseCollector:
    def collect(self) -> Iterator[Metric]:
        from approvals.models import ActionToken, ApprovalRequest
        from audit.models import AuditEvent

        minted = CounterMetricFamily("countersign_tokens_minted", "Tokens minted, by kind", labels=["kind"])
        counts = dict(
            AuditEvent.objects.filter(event__in=TOKEN_EVENTS, outcome="ok")
            .values("event")
            .annotate(n=Count("id"))
            .values_list("event", "n")
        )
        for event, kind in TOKEN_EVENTS.items():
            minted.add_metric([kind], counts.get(event, 0))
        yield minted

        by_status = GaugeMetricFamily(
            "countersign_approval_requests", "Approval requests by state", labels=["status"]
        )
        statuses = dict(
            ApprovalRequest.objects.values("status").annotate(n=Count("id")).values_list("status", "n")
        )
        for status in ApprovalRequest.Status.values:
            by_status.add_metric([status], statuses.get(status, 0))
        yield by_status

        yield GaugeMetricFamily(
            "countersign_pending_approvals",
            "Approval requests waiting for a user",
            value=ApprovalRequest.objects.filter(status="pending", expires_at__gt=timezone.now()).count(),
        )

        latency = GaugeMetricFamily(
            "countersign_prompt_delivery_seconds",
            "Request-to-browser delivery latency over the last hour",
            labels=["quantile"],
        )
        recent = ApprovalRequest.objects.filter(
            delivered_at__isnull=False, created__gte=timezone.now() - timedelta(hours=1)
        )
        delays = sorted(
            (d - c).total_seconds()
            for c, d in recent.values_list("created", "delivered_at")[:10000]
            if d is not None
        )  # delivered_at__isnull=False: always
        for q in (0.5, 0.99):
            latency.add_metric(
                [str(q)], delays[min(len(delays) - 1, int(q * len(delays)))] if delays else 0.0
            )
        yield latency

        yield seal_lag_histogram()

        redemptions = CounterMetricFamily(
            "countersign_redemptions", "Redemption attempts by outcome", labels=["outcome"]
        )
        redemptions.add_metric(["redeemed"], ActionToken.objects.filter(redeemed_at__isnull=False).count())
        redemptions.add_metric(["refused"], AuditEvent.objects.filter(event="redemption.refused").count())
        yield redemptions


def seal_lag_histogram() -> HistogramMetricFamily:
    """How long events waited for the audit sealer (now - occurred_at when linked); goal p99 < 2 s.

    The sealer keeps the cumulative counts in the audit head, so every node reports the same
    histogram whichever sealer process did the work.
    """
    from audit.selectors import audit_seal_lag
    from audit.services import SEAL_LAG_BUCKETS

    counts, total, count = audit_seal_lag()
    buckets, running = [], 0
    for bound, n in zip(SEAL_LAG_BUCKETS, counts, strict=True):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
    return HistogramMetricFamily(
        "countersign_audit_seal_lag_seconds",
        "Time from an audit event to its link in the hash chain",
        buckets=buckets,
        sum_value=total,
    )


class LimitsCollector:
    """Refusals by the limits (rate limits, lockouts, refused handshakes, oversized bodies), counted
    in Redis by every node (``consent.limits.store``): a flood is counted here, not audited row by row."""

    def collect(self) -> Iterator[Metric]:
        from consent.limits.store import refused_counts

        refusals = CounterMetricFamily(
            "countersign_limit_refusals", "Requests refused by a limit, by kind", labels=["kind"]
        )
        for kind, n in sorted(refused_counts().items()):
            refusals.add_metric([kind], n)
        yield refusals

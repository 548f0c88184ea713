"""The audit log for SIEMs and log shippers: JSON Lines, CSV and OCSF, each event with its tree position.

Schema ``countersign.audit.v1`` (one JSON object per sealed event, in position order):

``schema``, ``seq`` (position, 1-based), ``leaf_index`` (``seq - 1``, RFC 9162), ``id``,
``occurred_at`` (ISO 8601, UTC), ``event``, ``outcome`` (``ok`` | ``refused``), ``actor``
(``user:<pk>``, ``agent:<client_id>``, ``rs:<client_id>``, ``admin:<pk>``, ``cli`` or empty),
``user_id`` (int or null), ``client_id``, ``grant_id``, ``error``, ``detail`` (object),
``remote_addr``, ``sealed_at``, ``leaf_hash`` (hex). ``countersign.ledger.event_leaf_hash``
recomputes the leaf from the members ``LEAF_FIELDS`` name, so any exported event can be proven
with ``audit_prove`` / ``/audit/proofs/inclusion``. New members may be added within v1; a
change of meaning gets a new version.

CSV: the same columns, ``detail`` as its JCS (RFC 8785) JSON text, ``user_id`` empty for null.

OCSF 1.3 (``--format ocsf``): sign-ins (``login*``) as Authentication (class 3002), everything
else as API Activity (class 6003); the v1 document rides along whole in
``unmapped.countersign`` so the event stays provable.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import rfc8785
from django.db.models import Q, QuerySet
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.timezone import is_naive, make_aware

from .ledger import event_document
from .models import AuditLink

CSV_COLUMNS = (
    "schema",
    "seq",
    "leaf_index",
    "id",
    "occurred_at",
    "event",
    "outcome",
    "actor",
    "user_id",
    "client_id",
    "grant_id",
    "error",
    "detail",
    "remote_addr",
    "sealed_at",
    "leaf_hash",
)
FORMATS = ("jsonl", "csv", "ocsf")
OCSF_VERSION = "1.3.0"


class ExportFilterError(ValueError):
    """A filter that cannot be applied (the message says which and why)."""


def parse_when(value: str, *, name: str, end: bool = False) -> datetime:
    """An ISO 8601 date or date-time; a date alone means its start (or, for ``end``, the next day's)."""
    parsed = parse_datetime(value) if "T" in value or " " in value else None
    if parsed is None:
        day = parse_date(value) if len(value) == 10 else None
        if day is None:
            raise ExportFilterError(f"{name} must be an ISO 8601 date or date-time")
        from datetime import time, timedelta

        parsed = datetime.combine(day + timedelta(days=1) if end else day, time.min)
    return make_aware(parsed) if is_naive(parsed) else parsed


def principal_filter(principal: str) -> Q:
    """Events by or about a principal: ``user:<pk>`` (actor or the user concerned), ``agent:<client_id>``
    (actor or client), or any other actor string exactly."""
    kind, sep, ident = principal.partition(":")
    if not sep or not ident or len(principal) > 200:
        raise ExportFilterError(
            "principal must look like user:<pk>, agent:<client_id>, rs:<client_id> or admin:<pk>"
        )
    by_actor = Q(event__actor=principal)
    if kind == "user":
        if not ident.isdigit():
            raise ExportFilterError("user:<pk> needs a numeric pk")
        return by_actor | Q(event__user_id=int(ident))
    if kind == "agent":
        return by_actor | Q(event__client_id=ident)
    return by_actor


def sealed_events(
    *,
    after: int = 0,
    since: datetime | None = None,
    until: datetime | None = None,
    principal: str | None = None,
) -> QuerySet[AuditLink]:
    """Sealed events in position order (unsealed ones have no position yet: they follow once sealed)."""
    links = AuditLink.objects.select_related("event").filter(seq__gt=after).order_by("seq")
    if since is not None:
        links = links.filter(event__occurred_at__gte=since)
    if until is not None:
        links = links.filter(event__occurred_at__lt=until)
    if principal:
        links = links.filter(principal_filter(principal))
    return links


def document(link: AuditLink) -> dict[str, Any]:
    return event_document(link.event, seq=link.seq, leaf=link.leaf, sealed_at=link.sealed_at)


def csv_row(doc: dict[str, Any]) -> list[Any]:
    return [
        rfc8785.dumps(doc["detail"]).decode() if c == "detail" else "" if doc[c] is None else doc[c]
        for c in CSV_COLUMNS
    ]


_CREATE = ("given", "issued", "requested", "created", "enrolled", "delegated")
_UPDATE = (
    "redeemed",
    "refreshed",
    "extended",
    "changed",
    "rotated",
    "secret_reset",
    "delivered",
    "notified",
    "approved",
    "denied",
    "expired",
)
_DELETE = ("revoked", "cancelled")


def ocsf(doc: dict[str, Any]) -> dict[str, Any]:
    """One event as OCSF 1.3: Authentication (3002) for sign-ins, API Activity (6003) otherwise."""
    name, ok = doc["event"], doc["outcome"] == "ok"
    occurred = datetime.fromisoformat(doc["occurred_at"])
    if name.startswith("login"):
        class_uid, category_uid, class_name = 3002, 3, "Authentication"
        activity_id, activity = (
            (1, "Logon") if name in ("login", "login.failed", "login.otp_failed") else (99, "Other")
        )
    else:
        class_uid, category_uid, class_name = 6003, 6, "API Activity"
        verb = name.rsplit(".", 1)[-1]
        activity_id, activity = (
            (1, "Create")
            if verb in _CREATE
            else (4, "Delete")
            if verb in _DELETE
            else (3, "Update")
            if verb in _UPDATE
            else (99, "Other")
        )
    record: dict[str, Any] = {
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": class_uid * 100 + activity_id,
        "time": int(occurred.timestamp() * 1000),
        "severity_id": 1 if ok else 3,
        "severity": "Informational" if ok else "Medium",
        "status_id": 1 if ok else 2,
        "status": "Success" if ok else "Failure",
        "metadata": {
            "version": OCSF_VERSION,
            "uid": str(doc["id"]),
            "sequence": doc["seq"],
            "log_name": "audit",
            "correlation_uid": doc["grant_id"] or None,
            "product": {"name": "Countersign", "vendor_name": "Countersign"},
        },
        "actor": {"user": {"uid": doc["actor"] or "anonymous"}},
        "unmapped": {"countersign": doc},
        "message": name,
    }
    if doc["error"]:
        record["status_code"] = doc["error"]
    if doc["remote_addr"]:
        record["src_endpoint"] = {"ip": doc["remote_addr"]}
    if doc["user_id"] is not None:
        record["user"] = {"uid": f"user:{doc['user_id']}"}
    if class_uid == 6003:
        record["api"] = {"operation": name}
        if doc["client_id"]:
            record["actor"]["app_uid"] = doc["client_id"]
    return record


def render(docs: Iterator[dict[str, Any]], fmt: str) -> Iterator[str]:
    """Text chunks of ``docs`` in ``fmt`` (one line per event; CSV with a header)."""
    if fmt not in FORMATS:
        raise ExportFilterError(f"format must be one of {', '.join(FORMATS)}")
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        for doc in docs:
            writer.writerow(csv_row(doc))
            if buffer.tell() > 65536:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()
        return
    for doc in docs:
        yield (
            json.dumps(ocsf(doc) if fmt == "ocsf" else doc, separators=(",", ":"), ensure_ascii=False) + "\n"
        )

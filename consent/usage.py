"""Usage reports: resource servers tell us, after the fact, each use they accepted of a session token.

Countersign sees a session token only when it is minted; the uses happen downstream. The
``countersign`` verifier reports them (batched, asynchronously, never in the request path) to
``/o/usage/`` with the resource server's own credentials. A report counts only for a token we
issued for that resource server's audience (RFC 9068 §4: ``aud`` names who may accept it) and
for a scope the token carries; its ``id`` makes a repeated report count once.
"""

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import current_app
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record

from .errors import InvalidRequest, InvalidTarget
from .models import AccessToken, GrantUse, ResourceServer, ScopePolicy

MAX_REPORTS = 100
OUTCOMES = ("accepted", "ok", "refused", "error")
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_OPERATION = re.compile(r"^[^\x00-\x1f\x7f]{0,80}$")
# How far in the past a reported use may lie (a verifier holds reports for seconds, not days).
MAX_AGE = timedelta(hours=24)


@dataclass(frozen=True)
class UsageResult:
    accepted: int
    duplicates: int


def _parse(item: Any, index: int, now: datetime) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidRequest(f"uses[{index}] is not an object")
    report_id, jti, scope = item.get("id"), item.get("jti"), item.get("scope")
    operation, outcome, at = item.get("operation", ""), item.get("outcome", "accepted"), item.get("at")
    if not isinstance(report_id, str) or not _ID.fullmatch(report_id):
        raise InvalidRequest(f"uses[{index}].id must be 8-64 characters of [A-Za-z0-9_-]")
    if not isinstance(jti, str) or not 0 < len(jti) <= 64:
        raise InvalidRequest(f"uses[{index}].jti is missing or too long")
    if not isinstance(scope, str) or not 0 < len(scope) <= 100 or " " in scope:
        raise InvalidRequest(f"uses[{index}].scope must be the one scope the use needed")
    if not isinstance(operation, str) or not _OPERATION.fullmatch(operation):
        raise InvalidRequest(
            f"uses[{index}].operation must be a short label (80 characters, no control characters)"
        )
    if outcome not in OUTCOMES:
        raise InvalidRequest(f"uses[{index}].outcome must be one of {', '.join(OUTCOMES)}")
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise InvalidRequest(f"uses[{index}].at must be the time of the use (seconds since the epoch)")
    used_at = datetime.fromtimestamp(at, tz=UTC)
    if used_at > now + timedelta(seconds=60) or used_at < now - MAX_AGE:
        raise InvalidRequest(f"uses[{index}].at is not a recent time")
    return {
        "report_id": report_id,
        "jti": jti,
        "scope": scope,
        "operation": operation,
        "outcome": outcome,
        "used_at": used_at,
    }


def grant_uses_record(*, resource_server: ResourceServer, uses: Any) -> UsageResult:
    """Store a batch of reported uses, all or nothing. Raises ``InvalidRequest`` (malformed) or
    ``InvalidTarget`` (a token not issued for this resource server, or a scope it lacks)."""
    if not isinstance(uses, list) or not uses:
        raise InvalidRequest("uses must be a non-empty array")
    if len(uses) > MAX_REPORTS:
        raise InvalidRequest(f"at most {MAX_REPORTS} uses per report")
    now = timezone.now()
    parsed = [_parse(item, i, now) for i, item in enumerate(uses)]
    if len({p["report_id"] for p in parsed}) != len(parsed):
        raise InvalidRequest("two uses in one report share an id")
    tokens = {
        row["jti"]: row
        for row in AccessToken.objects.filter(jti__in={p["jti"] for p in parsed}).values(
            "jti", "scope", "session_grant_id", "session_grant__user_id", "application__client_id"
        )
    }
    audiences = dict(
        ScopePolicy.objects.filter(name__in={p["scope"] for p in parsed}).values_list("name", "audience")
    )
    for i, p in enumerate(parsed):
        token = tokens.get(p["jti"])
        if token is None:
            raise InvalidTarget(f"uses[{i}]: no session token with that jti was issued", reason="unknown jti")
        if (
            p["scope"] not in (token["scope"] or "").split()
            or audiences.get(p["scope"]) != resource_server.audience
        ):
            raise InvalidTarget(
                f"uses[{i}]: that token was not issued to this resource server for {p['scope']}",
                reason="token not issued for this resource server",
            )
    seen = set(
        GrantUse.objects.filter(
            resource_server=resource_server, report_id__in=[p["report_id"] for p in parsed]
        ).values_list("report_id", flat=True)
    )
    fresh = [p for p in parsed if p["report_id"] not in seen]
    with transaction.atomic():
        GrantUse.objects.bulk_create(
            [
                GrantUse(
                    grant_id=tokens[p["jti"]]["session_grant_id"],
                    resource_server=resource_server,
                    received_at=now,
                    **p,
                )
                for p in fresh
            ],
            ignore_conflicts=True,
        )
        by_grant: dict[Any, list[dict[str, Any]]] = {}
        for p in fresh:
            by_grant.setdefault(tokens[p["jti"]]["session_grant_id"], []).append(p)
        for grant_id, items in by_grant.items():
            token = tokens[items[0]["jti"]]
            # One audit row per grant and report, not per use: a busy system cannot grow the trail
            # by a row for every request it serves.
            audit_record(
                event="grant.used",
                actor=f"rs:{resource_server.client_id}",
                user_id=token["session_grant__user_id"],
                client_id=token["application__client_id"],
                grant_id=grant_id,
                detail={
                    "uses": len(items),
                    "operations": sorted({i["operation"] or i["scope"] for i in items})[:10],
                    "refused": sum(i["outcome"] in ("refused", "error") for i in items),
                },
            )
            user_id = token["session_grant__user_id"]
            transaction.on_commit(functools.partial(_announce, grant_id, user_id), robust=True)
    return UsageResult(accepted=len(fresh), duplicates=len(parsed) - len(fresh))


def _announce(grant_id: Any, user_id: int) -> None:
    # By its registered name (approvals.tasks): consent does not import the app above it.
    current_app.tasks["approvals.push_grant_changed"].delay(str(grant_id), int(user_id))

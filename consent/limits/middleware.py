"""The rate-limit layer for HTTP, and the attempt limit on the secrets protocol clients present.

One hook for every endpoint. Per request, at most one Redis round trip (``consent.limits.store.hit``,
a Lua script): is the client or source locked out for failed authentication, and is any rate
counter of the request's rule (``COUNTERSIGN["RATE_LIMITS"]``) over its limit. Counters with room
for many requests are leased to the process a few units at a time, so most requests need no
round trip at all (``store.lease_size``; a lockout set by another node holds within
``store.LOCK_FRESH_SECONDS``). No SQL.

- Protocol endpoints (token, backchannel authentication, revocation: agents; introspection,
  redemption: resource servers) are limited per client (the client id the request names) and per
  source address. A 401 ``invalid_client`` answer counts one failed attempt against the named
  client and the source (``consent.limits.attempts``), and gives back the client's rate unit, so guesses
  naming another client do not use up that client's rate. Counting happens on failures only.
- Pages are limited per signed-in user and per source.

A refused request gets 429 with ``Retry-After`` (RFC 6585 §4): ``slow_down`` for a CIBA poll
(CIBA Core §11), ``temporarily_unavailable`` for other protocol requests, a short page for people.
It changes nothing and reaches no view. The first refusal of a counter's window leaves an audit
row; the rest are counted (``/metrics``: ``countersign_limit_refusals``), so a flood cannot grow
the audit table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from consent.conf import countersign_settings
from consent.errors import InvalidRequest, TooManyRequests
from consent.http import claimed_client_id, error_response

from . import attempts, store

log = logging.getLogger(__name__)

CIBA_GRANT = "urn:openid:params:grant-type:ciba"
# Which secret a protocol endpoint checks (consent.limits.attempts kinds).
SECRET_KINDS = {
    "/o/token/": "client",
    "/o/bc-authorize/": "client",
    "/o/revoke/": "client",
    "/o/introspect/": "resource_server",
    "/o/redeem/": "resource_server",
    "/o/rs-approvals/": "resource_server",
    "/o/rs-approvals/token/": "resource_server",
}


Dimension = tuple[str, int, int]  # (dimension, limit, window s)
_compiled: tuple[Any, list[tuple[str, tuple[str, ...], list[Dimension]]]] = (None, [])
_BY_USER: set[str] = set()  # the compiled rules that count per signed-in user


def rule_for(path: str) -> tuple[str, list[Dimension]] | None:
    """(rule name, [(dimension, limit, window s)]) of the first rule matching ``path``, or None."""
    global _compiled
    rules = countersign_settings.RATE_LIMITS
    if _compiled[0] is not rules:  # settings replaced (tests, reload): compile again
        _compiled = (
            rules,
            [
                (
                    name,
                    tuple(rule["paths"]),
                    [(dim, int(v[0]), int(v[1])) for dim, v in rule.items() if dim != "paths" and v],
                )
                for name, rule in rules.items()
                if rule
            ],
        )
        _BY_USER.clear()
        _BY_USER.update(name for name, _, dims in _compiled[1] if any(dim == "user" for dim, _, _ in dims))
        _plans.clear()  # built from the rules replaced
    for name, prefixes, dims in _compiled[1]:
        if path.startswith(prefixes):
            return name, dims
    return None


def _source(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR", ""))[:64]


def _is_machine(path: str) -> bool:
    return path.startswith(("/o/", "/.well-known/", "/audit/")) and not path.startswith("/o/authorize/")


def refusal_response(request: HttpRequest, exc: TooManyRequests) -> HttpResponse:
    headers = {"Retry-After": str(exc.retry_after)}
    if _is_machine(request.path_info):
        return error_response(exc, headers=headers)
    response = HttpResponse(
        f"<!doctype html><title>Too many requests</title><h1>Too many requests</h1><p>{exc.description}</p>",
        status=429,
        headers={**headers, "Cache-Control": "no-store"},
    )
    return response


def _audit_first(
    request: HttpRequest,
    *,
    event: str,
    error: str,
    detail: dict[str, Any],
    client_id: str = "",
    user_id: int | None = None,
) -> None:
    from audit.services import audit_refusal

    try:
        audit_refusal(
            event=event,
            error=error,
            actor=f"user:{user_id}" if user_id else "",
            user_id=user_id,
            client_id=client_id,
            request=request,
            detail=detail,
        )
    except DatabaseError:  # the database is down: the refusal still stands, and is counted
        log.error("limits: could not audit %s (database unavailable)", event)


Counter = tuple[str, int, int, str]  # (key, limit, window s, metric field), as store.hit takes them
Plan = tuple[list[Counter], dict[str, str], list[tuple[str, str]]]  # counters, secret keys, lockout keys
# What a request of one (rule, secret kind, client, source, user) asks the store, built once: the
# same few clients and sources send nearly every protocol request, and building the keys was a
# third of this layer's ~90,000 instructions per request (callgrind). Bounded: the client id is
# whatever a request claims. Dropped whenever ``rule_for`` compiles the rules again.
_plans: dict[tuple[str, str | None, str, str, int | None], Plan] = {}
PLANS_MAX = 4096


def _plan(
    name: str, dims: list[Dimension], kind: str | None, client_id: str, source: str, user_id: int | None
) -> Plan:
    key = (name, kind, client_id, source, user_id)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    values = {"source": source, "client": client_id, "user": str(user_id) if user_id else ""}
    counters = [
        (f"r:{name}:{dim}:{values[dim]}", limit, window, f"rate:{name}:{dim}")
        for dim, limit, window in dims
        if values.get(dim)
    ]
    secret_keys = attempts.keys_for(account=client_id, source=source) if kind else {}
    locks = (
        [
            (lock, f"locked:{kind}:{dim}")
            for lock, dim in zip(attempts.lock_keys(kind, secret_keys), secret_keys, strict=True)
        ]
        if kind
        else []
    )
    plan = (counters, secret_keys, locks)
    if len(_plans) >= PLANS_MAX:
        _plans.clear()
    _plans[key] = plan
    return plan


class RateLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if not countersign_settings.RATE_LIMITS_ENABLED:
            return self.get_response(request)
        path = request.path_info
        rule = rule_for(path)
        if rule is None:
            return self.get_response(request)
        name, dims = rule
        kind = SECRET_KINDS.get(path) if request.method == "POST" else None
        source = _source(request)
        client_id, user_id = "", None
        if kind is not None:
            try:
                client_id = claimed_client_id(request)
            except (RequestDataTooBig, TooManyFieldsSent) as exc:
                return self._too_big(request, exc)
        if name in _BY_USER:
            user = getattr(request, "user", None)
            try:
                signed_in = user is not None and user.is_authenticated
            except DatabaseError:  # sessions unreadable: the view answers (DependencyDownMiddleware)
                signed_in = False
            if signed_in:
                assert user is not None  # signed_in says so
                user_id = user.pk
        counters, secret_keys, locks = _plan(name, dims, kind, client_id, source, user_id)
        if not counters and not locks:
            return self.get_response(request)
        hit, index, ms, first = store.hit(locks, counters)
        if hit:
            return self._refuse(
                request,
                hit,
                index,
                ms,
                first,
                name=name,
                counters=counters,
                kind=kind,
                client_id=client_id,
                user_id=user_id,
            )
        response = self.get_response(request)
        if (
            kind is not None
            and response.status_code == 401
            and 'error="invalid_client"' in response.get("WWW-Authenticate", "")
        ):
            refund = next((key for key, *_ in counters if key.startswith(f"r:{name}:client:")), "")
            attempts.failed(kind, secret_keys, request=request, refund=refund, client_id=client_id)
        return response

    def _refuse(
        self,
        request: HttpRequest,
        hit: int,
        index: int,
        ms: int,
        first: bool,
        *,
        name: str,
        counters: list[tuple[str, int, int, str]],
        kind: str | None,
        client_id: str,
        user_id: int | None,
    ) -> HttpResponse:
        seconds = -(-ms // 1000)
        ciba_poll = request.path_info == "/o/token/" and request.POST.get("grant_type") == CIBA_GRANT
        if hit == 1:  # a lockout: audited when it tripped, counted now (in the script)
            exc = TooManyRequests(
                f"Too many failed authentication attempts; try again in {attempts.in_minutes(seconds)}.",
                retry_after=seconds,
            )
            return refusal_response(request, exc)
        dim = counters[index][0].split(":")[2]
        if first:
            _audit_first(
                request,
                event="rate.limited",
                error="too_many_requests",
                client_id=client_id,
                user_id=user_id,
                detail={"rule": name, "per": dim, "path": request.path_info[:200], "retry_after": seconds},
            )
        exc = TooManyRequests(
            f"Too many requests; retry after {seconds} seconds.",
            retry_after=seconds,
            error="slow_down" if ciba_poll else "",
        )
        return refusal_response(request, exc)

    def _too_big(self, request: HttpRequest, exc: Exception) -> HttpResponse:
        source = _source(request)
        if store.first_refusal(f"too_big:{source}", field="too_big", window=60):
            _audit_first(
                request,
                event="http.request_refused",
                error="invalid_request",
                detail={"reason": type(exc).__name__, "path": request.path_info[:200]},
            )
        return error_response(InvalidRequest("The request body is too large or has too many fields."))

"""Attempt limits on secrets, one mechanism for every secret but the sign-in password.

Kinds (``COUNTERSIGN["ATTEMPT_LIMITS"]``): ``client`` (agent secrets and ``private_key_jwt``
assertions), ``resource_server`` (resource-server credentials), ``fresh_auth`` (re-authenticating
before approving), ``totp`` (TOTP codes). Each failure counts against the account and against the
source address; reaching either limit locks that one for ``LOCKOUT_SECONDS``, doubled on every
further lockout within a day (backoff), capped at ``LOCKOUT_MAX_SECONDS``. While locked, the
secret is not even checked: a right guess cannot be told from a wrong one. A lockout leaves one
audit row when it trips; the refusals during it are counted (``/metrics``).

Counting happens on failures only; the success path pays for the lockout check alone, which the
protocol endpoints fold into their one rate-limit round trip (``consent.limits.middleware``).
"""

from __future__ import annotations

import math
from typing import Any

from django.http import HttpRequest

from consent.conf import countersign_settings

from . import store


def policy(kind: str) -> dict[str, int]:
    limits: dict[str, int] = countersign_settings.ATTEMPT_LIMITS[kind]
    return limits


def keys_for(*, account: Any, source: str) -> dict[str, str]:
    keys = {}
    if account not in (None, ""):
        keys["account"] = str(account)[:200]
    if source:
        keys["source"] = source
    return keys


def lock_keys(kind: str, keys: dict[str, str]) -> list[str]:
    """The lockout keys of ``keys``, relative to ``store.PREFIX`` (for ``store.hit``)."""
    return [f"l:{kind}:{dim}:{value}" for dim, value in keys.items()]


def locked(kind: str, keys: dict[str, str]) -> int:
    """Seconds left of a lockout on the account or the source (0: not locked)."""
    return store.locked(kind, keys)


def failed(
    kind: str,
    keys: dict[str, str],
    *,
    request: HttpRequest | None = None,
    refund: str = "",
    actor: str = "",
    user_id: int | None = None,
    client_id: str = "",
) -> int:
    """Count a failed attempt. Returns the lockout seconds it started (0: none), audited once."""
    rules = policy(kind)
    limits = {dim: int(rules[dim]) for dim in keys if rules.get(dim)}
    if not limits:
        return 0
    tripped = store.fail(
        kind,
        {d: keys[d] for d in limits},
        limits=limits,
        window=int(rules["seconds"]),
        base=countersign_settings.LOCKOUT_SECONDS,
        cap=countersign_settings.LOCKOUT_MAX_SECONDS,
        refund=refund,
    )
    if not tripped:
        return 0
    from django.db import DatabaseError

    from audit.services import audit_refusal

    seconds = max(tripped.values())
    try:
        audit_refusal(
            event="attempts.locked",
            error="too_many_attempts",
            actor=actor,
            user_id=user_id,
            client_id=client_id,
            request=request,
            detail={
                "kind": kind,
                "locked": sorted(tripped),
                "seconds": seconds,
                "account": keys.get("account", "") if "account" in tripped else "",
            },
        )
    except DatabaseError:  # the lockout holds without its row
        pass
    return seconds


def succeeded(kind: str, keys: dict[str, str]) -> None:
    store.clear(kind, keys)


def refused_while_locked(kind: str, keys: dict[str, str]) -> None:
    """A refusal during a lockout: counted, never a row of its own (the lockout has one)."""
    store.count(f"locked:{kind}")


def in_minutes(seconds: int) -> str:
    """ "try again in N minutes", as people read it."""
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def message(seconds: int) -> str:
    return f"Too many attempts. Try again in {in_minutes(seconds)}."

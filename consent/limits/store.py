"""The limit counters, in Redis so that every node shares them. Each question is one Lua script.

Keys (all under ``cs:lim:``, all expiring):

- ``r:<rule>:<dimension>:<value>`` a fixed-window request counter;
- ``f:<kind>:<dimension>:<value>`` failed attempts in the attempt window;
- ``l:<kind>:<dimension>:<value>`` a lockout, its TTL the time left;
- ``t:<kind>:<dimension>:<value>`` lockouts within a day (the backoff exponent);
- ``a:<name>`` "a refusal of this kind was audited in this window" markers;
- ``refused`` one hash: refusals counted, by kind, for ``/metrics``.

Redis unreachable: every check answers "allowed" for ``OUTAGE_SECONDS`` without trying again, so
an outage costs one timeout per process, not one per request (logged once per outage).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from django.conf import settings

log = logging.getLogger(__name__)
PREFIX = "cs:lim:"
REFUSED = PREFIX + "refused"
OUTAGE_SECONDS = 5.0

# Request: lockouts first (any live one refuses), then each rate counter. A counter is taken
# ``lease`` units at a time (INCRBY): the process spends the rest of its lease without asking again
# (``hit``). The first counter already at its limit refuses.
# Returns {0, granted, ms left, ...per counter} when allowed, else {kind (1 lock, 2 rate), index,
# ms left, first}. KEYS: locks..., counters..., the metrics hash. ARGV[1], one string (fewer
# arguments to encode per request): "<#locks> <lock field>... <limit> <window ms> <counter field>
# <lease>...".
_HIT = """
local spec = {}
for word in string.gmatch(ARGV[1], '%S+') do spec[#spec + 1] = word end
local nlocks = tonumber(spec[1])
local stats = KEYS[#KEYS]
for i = 1, nlocks do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl > 0 then
    redis.call('HINCRBY', stats, spec[1 + i], 1)
    return {1, i, ttl, 0}
  end
end
local out = {0}
for j = 1, #KEYS - 1 - nlocks do
  local base = 1 + nlocks + 4 * (j - 1)
  local limit, window, field = tonumber(spec[base + 1]), spec[base + 2], spec[base + 3]
  local lease = tonumber(spec[base + 4])
  local key = KEYS[nlocks + j]
  local count = redis.call('INCRBY', key, lease)
  if count == lease then redis.call('PEXPIRE', key, window) end
  local before = count - lease
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then redis.call('PEXPIRE', key, window); ttl = tonumber(window) end
  if before >= limit then
    redis.call('HINCRBY', stats, field, 1)
    -- the first refusal of the window: the last grant may have taken the counter past the limit
    return {2, j, ttl, before < limit + lease and 1 or 0}
  end
  out[#out + 1] = math.min(lease, limit - before)
  out[#out + 1] = ttl
end
return out
"""

# A failed attempt: for each dimension INCR its failure counter; at the limit, lock it for
# base * 2^(lockouts today), capped. KEYS per dimension: f, l, t; then an optional refund counter.
# ARGV: limit, window ms, base ms, max ms, then 1/0 "refund the last key". Returns per dimension
# the lockout ms set now (0: not tripped).
_FAIL = """
local limit, window, base, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local refund = tonumber(ARGV[5])
local n = (#KEYS - refund) / 3
local out = {}
for d = 0, n - 1 do
  local f, l, t = KEYS[3 * d + 1], KEYS[3 * d + 2], KEYS[3 * d + 3]
  local count = redis.call('INCR', f)
  if count == 1 then redis.call('PEXPIRE', f, window) end
  local limit_d = tonumber(ARGV[6 + d]) or limit
  if count >= limit_d and redis.call('PTTL', l) <= 0 then
    local trips = redis.call('INCR', t)
    redis.call('PEXPIRE', t, 86400000)
    local ms = math.min(cap, base * 2 ^ (trips - 1))
    redis.call('SET', l, trips, 'PX', ms)
    redis.call('DEL', f)
    out[#out + 1] = ms
  else
    out[#out + 1] = 0
  end
end
if refund == 1 then
  local r = KEYS[#KEYS]
  if tonumber(redis.call('GET', r) or '0') > 0 then redis.call('DECR', r) end
end
return out
"""

# A refusal to count, audited only when it is the first of its kind in the window.
# KEYS: marker, metrics hash; ARGV: window ms, metric field. Returns 1 when this one is to be audited.
_FIRST = """
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'NX') then return 1 end
return 0
"""

_lock = threading.Lock()
_client: redis.Redis | None = None
_scripts: dict[str, Any] = {}
_down_until = 0.0


def client() -> redis.Redis:
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = redis.Redis.from_url(
                    settings.REDIS_URL,
                    socket_timeout=0.5,
                    socket_connect_timeout=0.5,
                    health_check_interval=30,
                )
                for name, source in (("hit", _HIT), ("fail", _FAIL), ("first", _FIRST)):
                    _scripts[name] = _client.register_script(source)
    return _client


def _run(name: str, keys: list[str], args: list[Any]) -> Any:
    """Run a script; None when Redis is unreachable (the caller then allows)."""
    global _down_until
    if _down_until and time.monotonic() < _down_until:
        return None
    try:
        client()
        result = _scripts[name](keys=keys, args=args)
    except redis.RedisError as exc:
        if not _down_until:
            log.error("limits: Redis unavailable, limits fail open for now: %s", type(exc).__name__)
        _down_until = time.monotonic() + OUTAGE_SECONDS
        return None
    _down_until = 0.0
    return result


# Leases. A counter with room for many requests is taken from Redis ``lease_size(limit)`` units at
# a time; this process admits that many requests on it without a round trip, until the counter's
# window ends. A lease is at most 1/LEASE_SHARE of the limit, so N processes overshoot nothing
# and, at worst, leave N * lease units of a window unused; a limit below 2 * LEASE_SHARE is asked
# about on every request, as before. While a lease is spent, "no live lockout on these keys" is
# believed for LOCK_FRESH_SECONDS: a lockout another process sets takes effect here within that
# long, one this process sets (``fail``) at once.
LEASE_MAX = 16
LEASE_SHARE = 64
LOCK_FRESH_SECONDS = 1.0
_local = threading.Lock()
_leases: dict[str, list[float]] = {}  # counter key -> [units left, monotonic time its window ends]
_unlocked: dict[tuple[tuple[str, str], ...], float] = {}  # lockouts -> monotonic time "none live" holds until


def lease_size(limit: int) -> int:
    return max(1, min(LEASE_MAX, limit // LEASE_SHARE))


def _spend_leases(locks: list[tuple[str, str]], counters: list[tuple[str, int, int, str]]) -> bool:
    """Admit one request from this process's leases, if every counter holds one (no round trip)."""
    if not counters:
        return False
    now = time.monotonic()
    with _local:
        if locks and _unlocked.get(tuple(locks), 0.0) <= now:
            return False
        held = []
        for counter in counters:
            lease = _leases.get(counter[0])
            if lease is None or lease[0] < 1 or lease[1] <= now:
                return False
            held.append(lease)
        for lease in held:
            lease[0] -= 1
    return True


def _keep_leases(
    locks: list[tuple[str, str]], counters: list[tuple[str, int, int, str]], granted: list[Any]
) -> None:
    now = time.monotonic()
    with _local:
        for (key, *_), units, ms in zip(counters, granted[0::2], granted[1::2], strict=True):
            _leases[key] = [float(int(units) - 1), now + int(ms) / 1000]
        if locks:
            _unlocked[tuple(locks)] = now + LOCK_FRESH_SECONDS
        if len(_leases) > 10_000:  # one per client and source seen this window: drop the ended ones
            for key in [k for k, (_, until) in _leases.items() if until <= now]:
                del _leases[key]
        if len(_unlocked) > 10_000:
            _unlocked.clear()


def _forget_local() -> None:
    with _local:
        _leases.clear()
        _unlocked.clear()


def hit(
    locks: list[tuple[str, str]], counters: list[tuple[str, int, int, str]]
) -> tuple[int, int, int, bool]:
    """One request: ``locks`` are (key, metric field); ``counters`` (key, limit, window s, metric field).

    Returns (0, ...) when allowed; (1, index, ms left, False) for a live lockout; (2, index, ms
    left, first) when counter ``index`` is over its limit (``first``: the first refusal of its window).
    """
    if _spend_leases(locks, counters):
        return 0, 0, 0, False
    keys = [PREFIX + k for k, _ in locks] + [PREFIX + k for k, *_ in counters] + [REFUSED]
    spec = [str(len(locks)), *(field.replace(" ", "_") for _, field in locks)]
    leases = [lease_size(limit) for _, limit, _, _ in counters]
    for (_, limit, window, field), lease in zip(counters, leases, strict=True):
        spec += [str(limit), str(window * 1000), field.replace(" ", "_"), str(lease)]
    result = _run("hit", keys, [" ".join(spec)])
    if not result:
        return 0, 0, 0, False
    if not result[0]:
        if any(lease > 1 for lease in leases):
            _keep_leases(locks, counters, result[1:])
        return 0, 0, 0, False
    kind, index, ms, first = (int(x) for x in result)
    return kind, index - 1, ms, bool(first)


def fail(
    kind: str,
    keys: dict[str, str],
    *,
    limits: dict[str, int],
    window: int,
    base: int,
    cap: int,
    refund: str = "",
) -> dict[str, int]:
    """Count one failed attempt for each dimension in ``keys``; returns dimension -> lockout seconds
    set by this failure (only the dimensions that tripped now). ``refund``: a rate counter to give
    back (a refused secret should not use up the rate of the client it claims to be)."""
    dims = list(keys)
    script_keys = []
    for dim in dims:
        suffix = f"{kind}:{dim}:{keys[dim]}"
        script_keys += [f"{PREFIX}f:{suffix}", f"{PREFIX}l:{suffix}", f"{PREFIX}t:{suffix}"]
    if refund:
        script_keys.append(PREFIX + refund)
    args = [
        max(limits.values()),
        window * 1000,
        base * 1000,
        cap * 1000,
        1 if refund else 0,
        *(limits[d] for d in dims),
    ]
    with _local:
        _unlocked.clear()  # a lockout this failure may set holds here at once
    result = _run("fail", script_keys, args)
    if not result:
        return {}
    return {dim: -(-int(ms) // 1000) for dim, ms in zip(dims, result, strict=True) if int(ms)}


def locked(kind: str, keys: dict[str, str]) -> int:
    """Seconds left of the longest lockout on any of ``keys`` (0: none). One round trip."""
    global _down_until
    if not keys or (_down_until and time.monotonic() < _down_until):
        return 0
    try:
        pipe = client().pipeline(transaction=False)
        for dim, value in keys.items():
            pipe.pttl(f"{PREFIX}l:{kind}:{dim}:{value}")
        left = max(pipe.execute())
    except redis.RedisError:
        _down_until = time.monotonic() + OUTAGE_SECONDS
        return 0
    return -(-int(left) // 1000) if left > 0 else 0


def clear(kind: str, keys: dict[str, str]) -> None:
    """Forget failures (not lockouts) after a success."""
    try:
        client().delete(*(f"{PREFIX}f:{kind}:{dim}:{value}" for dim, value in keys.items()))
    except redis.RedisError:
        pass


def first_refusal(name: str, *, field: str, window: int) -> bool:
    """Count a refusal under ``field``; True when it is the first for ``name`` in ``window`` seconds
    (the one to audit). Redis down: True (auditing every refusal is the safe side)."""
    result = _run("first", [f"{PREFIX}a:{name}", REFUSED], [window * 1000, field])
    return True if result is None else bool(result)


def count(field: str, n: int = 1) -> None:
    try:
        client().hincrby(REFUSED, field, n)
    except redis.RedisError:
        pass


def refused_counts() -> dict[str, int]:
    try:
        raw: dict[bytes, bytes] = client().hgetall(REFUSED)  # type: ignore[assignment]  # a sync client's reply
    except redis.RedisError:
        return {}
    return {k.decode(): int(v) for k, v in raw.items()}


def reset() -> None:
    """Delete every limit key, and this process's leases (tests)."""
    _forget_local()
    c = client()
    keys = list(c.scan_iter(match=PREFIX + "*", count=1000))
    if keys:
        c.delete(*keys)

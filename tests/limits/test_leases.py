"""Rate-counter leases (``consent.limits.store``): a counter with room for many requests is taken
from Redis a few units at a time, so most requests are admitted without a round trip, and the
limit still holds exactly; a lockout set elsewhere is believed within ``LOCK_FRESH_SECONDS``.
"""

import time
from collections.abc import Iterator
from typing import Any

import pytest

from consent.limits import store


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    store.reset()
    yield
    store.reset()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the scripts sent to Redis."""
    sent: list[str] = []
    real = store._run

    def run(name: str, keys: list[str], args: list[Any]) -> Any:
        sent.append(name)
        return real(name, keys, args)

    monkeypatch.setattr(store, "_run", run)
    return sent


def counter(key: str, limit: int) -> tuple[str, int, int, str]:
    return (key, limit, 60, "rate:test:client")


def redis_count(key: str) -> int:
    return int(store.client().get(store.PREFIX + key) or 0)


def test_a_roomy_counter_is_asked_about_once_per_lease(round_trips: list[str]) -> None:
    limit = 64 * 16 * 10
    assert store.lease_size(limit) == store.LEASE_MAX
    for _ in range(store.LEASE_MAX * 3):
        assert store.hit([], [counter("r:test:client:a", limit)]) == (0, 0, 0, False)
    assert round_trips == ["hit"] * 3
    assert redis_count("r:test:client:a") == store.LEASE_MAX * 3


def test_the_limit_holds_exactly_with_leases(round_trips: list[str]) -> None:
    limit = 128  # leases of 2
    assert store.lease_size(limit) == 2
    outcomes = [store.hit([], [counter("r:test:client:b", limit)])[0] for _ in range(limit + 3)]
    assert outcomes == [0] * limit + [2, 2, 2]
    assert len(round_trips) == limit // 2 + 3


def test_a_small_limit_is_asked_about_on_every_request(round_trips: list[str]) -> None:
    outcomes = [store.hit([], [counter("r:test:client:c", 5)])[0] for _ in range(7)]
    assert outcomes == [0] * 5 + [2, 2]
    assert len(round_trips) == 7


def test_a_counter_without_room_keeps_the_whole_request_asking(round_trips: list[str]) -> None:
    both = [counter("r:test:client:d", 5), counter("r:test:source:d", 64 * 16)]
    assert [store.hit([], both)[0] for _ in range(6)] == [0] * 5 + [2]
    assert len(round_trips) == 6


@pytest.mark.parametrize("limit", [128, 129])  # 129: the last lease is granted in part
def test_the_first_refusal_of_a_window_is_flagged_once(limit: int) -> None:
    results = [store.hit([], [counter(f"r:test:client:e{limit}", limit)]) for _ in range(limit + 3)]
    assert [kind for kind, *_ in results] == [0] * limit + [2, 2, 2]
    assert [first for *_, first in results[limit:]] == [True, False, False]


def test_a_lockout_set_by_another_node_holds_within_lock_fresh_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store, "LOCK_FRESH_SECONDS", 0.2)
    locks = [("l:client:account:agent-f", "locked:client:account")]
    counters = [counter("r:test:client:f", 64 * 16 * 10)]
    assert store.hit(locks, counters)[0] == 0  # takes a lease, believes "no lockout" for 0.2 s
    store.client().set(store.PREFIX + "l:client:account:agent-f", 1, px=60_000)  # another node locks
    time.sleep(0.25)
    assert store.hit(locks, counters)[0] == 1


def test_a_failure_recorded_here_is_honoured_at_once() -> None:
    keys = {"account": "agent-g"}
    locks = [("l:client:account:agent-g", "locked:client:account")]
    counters = [counter("r:test:client:g", 64 * 16 * 10)]
    assert store.hit(locks, counters)[0] == 0
    tripped = store.fail("client", keys, limits={"account": 1}, window=60, base=30, cap=60)
    assert tripped == {"account": 30}
    assert store.hit(locks, counters)[0] == 1  # the lease is held, but the lockout is asked about

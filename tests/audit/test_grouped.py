"""Group commit of events written outside a transaction (``audit.grouped``), on PostgreSQL.

Real threads, each with its own connection, and committed rows (``transaction=True``). A batch is
made certain by holding the first write until the other callers have queued behind it.
"""

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from django.db import DataError, connection, connections, transaction

import audit.services as services
from audit.grouped import GroupCommit
from audit.models import AuditEvent
from audit.services import audit_event, audit_refusal

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail("group commit is PostgreSQL's path: set DATABASE_URL=postgres://... (make test)")


def _fields(name: str, **overrides: Any) -> dict[str, Any]:
    fields = audit_event(event="test.grouped", error="invalid_request", detail={"who": name}).fields
    fields.update(outcome=AuditEvent.Outcome.REFUSED, **overrides)
    return fields


def _held(group_size: int) -> tuple[GroupCommit, list[int]]:
    """A group over ``_append_many`` whose first write waits until ``group_size - 1`` more callers queued."""
    sizes: list[int] = []

    def write(batch: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
        if not sizes:
            deadline = time.monotonic() + 10
            while len(group._queue) < group_size - 1:
                assert time.monotonic() < deadline, "the other callers never queued"
                time.sleep(0.005)
        sizes.append(len(batch))
        return services._append_many(batch)

    group = GroupCommit(write)
    return group, sizes


def _run(n: int, target: Callable[[int], Any]) -> tuple[dict[int, Any], dict[int, BaseException]]:
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            errors[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.002)  # the first one leads, the others queue behind its held write
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller never returned"
    return results, errors


def test_callers_that_arrive_together_share_one_insert_and_each_gets_its_own_row() -> None:
    group, sizes = _held(12)

    results, errors = _run(12, lambda i: group.append(_fields(f"caller-{i}")))

    assert errors == {}
    assert sizes == [1, 11] and group.statements == 2  # the leader alone, then everyone who waited
    rows = {e.pk: e for e in AuditEvent.objects.filter(event="test.grouped")}
    assert len(rows) == 12
    for i, (pk, xid) in results.items():
        assert rows[pk].detail == {"who": f"caller-{i}"} and rows[pk].xid == xid
    # the leader's own transaction, and the batch's one
    assert sorted(Counter(xid for _, xid in results.values()).values()) == [1, 11]


def test_a_bad_row_fails_only_its_own_caller() -> None:
    group, sizes = _held(6)

    # PostgreSQL text cannot hold NUL: caller 3's row is refused, the batch is retried row by row.
    results, errors = _run(
        6, lambda i: group.append(_fields(f"caller-{i}", actor="a\x00b" if i == 3 else ""))
    )

    assert set(errors) == {3} and isinstance(errors[3], DataError)
    assert sorted(results) == [0, 1, 2, 4, 5]
    stored = sorted(AuditEvent.objects.filter(event="test.grouped").values_list("detail__who", flat=True))
    assert stored == [f"caller-{i}" for i in (0, 1, 2, 4, 5)]
    assert sizes[:2] == [1, 5]  # the shared INSERT was tried first


def test_refusals_from_many_threads_are_each_recorded_once() -> None:
    before = services._GROUPED.statements

    def refuse(i: int) -> AuditEvent:
        return audit_refusal(event="test.grouped", error="invalid_request", detail={"who": f"t{i}"})

    results, errors = _run(16, refuse)

    assert errors == {}
    stored = dict(AuditEvent.objects.filter(event="test.grouped").values_list("pk", "detail__who"))
    assert stored == {event.pk: f"t{i}" for i, event in results.items()}
    assert all(
        e.outcome == AuditEvent.Outcome.REFUSED for e in AuditEvent.objects.filter(event="test.grouped")
    )
    assert 1 <= services._GROUPED.statements - before <= 16


def test_an_event_inside_a_transaction_is_written_there_and_never_waits_for_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    original = services._append_many

    def held(batch: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
        assert release.wait(10)
        return original(batch)

    group = GroupCommit(held)
    monkeypatch.setattr(services, "_GROUPED", group)

    def outside() -> None:
        group.append(_fields("outside"))
        connections.close_all()

    leader = threading.Thread(target=outside)
    leader.start()
    deadline = time.monotonic() + 10
    while not group._writing:  # the leader's write is in progress, and held
        assert time.monotonic() < deadline
        time.sleep(0.005)

    inside: list[BaseException] = []

    def in_transaction() -> None:
        try:
            with transaction.atomic():
                audit_refusal(event="test.grouped", error="invalid_request", detail={"who": "inside"})
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        except BaseException as exc:  # noqa: BLE001
            inside.append(exc)
        finally:
            connections.close_all()

    t = threading.Thread(target=in_transaction)
    t.start()
    t.join(5)
    finished = not t.is_alive()
    release.set()
    leader.join(10)
    t.join(10)
    assert finished, "an event inside a transaction waited for the group's write"
    assert inside == []
    assert list(AuditEvent.objects.filter(event="test.grouped").values_list("detail__who", flat=True)) == [
        "outside"
    ]


def test_an_outage_while_rows_are_retried_one_by_one_reaches_only_that_row_and_every_caller_returns() -> None:
    from django.db import OperationalError

    queued = threading.Event()
    calls: list[list[str]] = []

    def write(batch: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
        who = [f["detail"]["who"] for f in batch]
        calls.append(who)
        if len(calls) == 1:  # the leader's own row: wait for the others to queue behind it
            assert queued.wait(10)
            return [(1, 1)]
        if len(batch) > 1:
            raise DataError("one of these rows is bad")
        if who == ["caller-2"]:
            raise OperationalError("the server went away")
        return [(int(who[0][-1]) + 10, 2)]

    group = GroupCommit(write)

    def wait_for_queue() -> None:
        deadline = time.monotonic() + 10
        while len(group._queue) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        queued.set()

    watcher = threading.Thread(target=wait_for_queue)
    watcher.start()
    results, errors = _run(4, lambda i: group.append(_fields(f"caller-{i}")))
    watcher.join(10)

    assert set(errors) == {2} and isinstance(errors[2], OperationalError)
    assert results == {0: (1, 1), 1: (11, 2), 3: (13, 2)}
    assert calls[1] == ["caller-1", "caller-2", "caller-3"]

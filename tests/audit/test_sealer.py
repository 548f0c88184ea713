"""The sealer on PostgreSQL: real threads and processes writing and sealing at once.

The bar, whatever the interleaving: every committed event is linked exactly once,
nothing rolled back is linked, links follow (transaction id, event id) order, and
``audit_verify`` passes. Rows are committed (``transaction=True``) so every thread
and process sees them. PostgreSQL's snapshot xmin is server-wide, so a transaction
open elsewhere on the server can hold sealing back for a while: the tests wait for
the chain to catch up instead of assuming it already has.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import time_machine
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

import audit.services as services
from audit.models import AuditEvent, AuditHead, AuditLink
from audit.services import audit_record, audit_refusal, audit_seal, audit_seal_all
from consent.keys import active_signing_key
from tests.audit.test_chain import verified
from tests.live import ROOT, _database_url

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.fail(
            "sealer tests need PostgreSQL transaction ids: set DATABASE_URL=postgres://... (make test)"
        )


def _seal_until_all_linked(timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while AuditEvent.objects.filter(link__isnull=True).exists():
        assert time.monotonic() < deadline, "events stayed unsealed (a transaction left open on the server?)"
        audit_seal_all(limit=50)
        time.sleep(0.05)


def _assert_each_event_linked_once_in_order() -> list[AuditLink]:
    links = list(AuditLink.objects.order_by("seq").select_related("event"))
    events = set(AuditEvent.objects.values_list("pk", flat=True))
    assert [link.seq for link in links] == list(range(1, len(links) + 1))
    assert sorted(link.event_id for link in links) == sorted(events), "an event missing or linked twice"
    order = [(link.event.xid, link.event_id) for link in links]
    assert order == sorted(order), "linked out of (transaction, event) order"
    head = AuditHead.objects.get(pk=1)
    assert (head.seq, head.hash) == (links[-1].seq, links[-1].hash)
    return links


class Writers:
    """Threads writing audited transactions: 1-3 events each, some slow, some rolled back, and
    refusals recorded outside any transaction. ``written`` counts what committed."""

    def __init__(self, n: int, transactions: int, seed: int = 1) -> None:
        self.n, self.transactions, self.seed = n, transactions, seed
        self.written = 0
        self.rolled_back: list[str] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"writer-{i}") for i in range(n)]

    def _run(self, i: int) -> None:
        rng = random.Random(self.seed * 100 + i)
        try:
            for t in range(self.transactions):
                tag = f"w{i}-t{t}"
                if rng.random() < 0.2:
                    audit_refusal(event="token.refused", error="invalid_client", client_id=tag)
                    with self._lock:
                        self.written += 1
                    continue
                events = rng.randint(1, 3)
                rollback = rng.random() < 0.15
                try:
                    with transaction.atomic():
                        for k in range(events):
                            audit_record(
                                event="token.issued", actor=f"agent:{tag}", detail={"k": k, "tag": tag}
                            )
                            time.sleep(rng.random() * 0.01)  # commit order differs from xid order
                        if rollback:
                            raise _RolledBack(tag)
                except _RolledBack:
                    self.rolled_back.append(tag)
                    continue
                with self._lock:
                    self.written += events
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
        finally:
            connection.close()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in self.threads), "a writer never finished"
        assert not self.errors, self.errors


class _RolledBack(Exception):
    pass


class Sealer(threading.Thread):
    """``audit_seal`` in a loop, as ``audit_seal --loop`` runs it, until told to stop."""

    def __init__(self, name: str, *, limit: int, wait: bool = False) -> None:
        super().__init__(name=name)
        self.limit, self.wait = limit, wait
        self.stopping = threading.Event()
        self.linked = self.busy = self.batches = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                result = audit_seal(limit=self.limit, wait=self.wait)
                self.linked += result.linked
                self.busy += result.busy
                self.batches += result.linked > 0
                if result.linked < self.limit:
                    time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
        assert not self.is_alive() and not self.errors, self.errors


def _until(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} (a transaction left open on the server?)"
        time.sleep(0.05)


def test_writers_and_a_sealer_at_once_link_every_event_exactly_once(db: None) -> None:
    writers = Writers(n=4, transactions=60)
    sealer = Sealer("sealer", limit=7)  # small batches: many cut short by their size
    sealer.start()
    writers.start()
    writers.join()
    _until(lambda: sealer.linked >= writers.written, "the sealer did not catch up")
    sealer.stop()
    assert writers.rolled_back, "no writer rolled back: the case was not tested"
    assert AuditEvent.objects.count() == writers.written == sealer.linked
    assert not AuditEvent.objects.filter(detail__tag__in=writers.rolled_back).exists()
    assert sealer.batches > writers.written // 7, "the batches were not cut short by their size"
    _assert_each_event_linked_once_in_order()
    verified()


def test_two_sealers_at_once_never_link_an_event_twice(db: None) -> None:
    writers = Writers(n=3, transactions=60, seed=2)
    sealers = [Sealer("try-sealer", limit=5), Sealer("waiting-sealer", limit=5, wait=True)]
    for s in sealers:
        s.start()
    writers.start()
    writers.join()
    _until(lambda: sum(s.linked for s in sealers) >= writers.written, "the sealers did not catch up")
    for s in sealers:
        s.stop()
    links = _assert_each_event_linked_once_in_order()
    assert len(links) == writers.written == sum(s.linked for s in sealers)
    print("two sealers:", [(s.name, s.batches, s.busy) for s in sealers])
    verified()


def test_a_long_transaction_that_commits_late_is_not_skipped(db: None) -> None:
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def long_writer() -> None:
        try:
            with transaction.atomic():
                audit_record(event="approval.requested", actor="agent:slow")  # its xid is taken here
                started.set()
                assert release.wait(timeout=60)
                audit_record(event="approval.delivered", actor="agent:slow")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=long_writer)
    thread.start()
    assert started.wait(timeout=30)
    later = [audit_record(event="token.issued", actor=f"agent:fast-{i}") for i in range(3)]  # committed now
    assert audit_seal_all() == 0, "linked events while an older transaction could still add earlier ones"
    assert not AuditLink.objects.exists()
    release.set()
    thread.join(timeout=60)
    assert not errors, errors
    _seal_until_all_linked()
    links = _assert_each_event_linked_once_in_order()
    assert [link.event.event for link in links] == ["approval.requested", "approval.delivered"] + [
        "token.issued"
    ] * 3
    assert [link.event_id for link in links[2:]] == [row.pk for row in later]
    verified()


SEAL_AND_HANG = """
import os, sys, time
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()
from django.db import transaction
from audit.services import audit_seal
with transaction.atomic():
    print(audit_seal(limit=int(sys.argv[1])).linked, flush=True)
    time.sleep(300)
"""


def test_a_sealer_killed_mid_batch_links_nothing_and_the_next_one_links_everything_once(db: None) -> None:
    for i in range(12):
        audit_record(event="token.issued", actor=f"agent:{i}")
    _seal_until_one_can_link()
    # The signing key exists before the hanging sealer's transaction, as it does once a server has run
    # (created inside it, it would keep this process's own first key waiting on that transaction).
    active_signing_key()
    env = {**os.environ, "DATABASE_URL": _database_url(), "DATABASE_POOL": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SEAL_AND_HANG, "5"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None  # both piped
    try:
        line = proc.stdout.readline().strip()
        assert line == "5", (line, proc.stderr.read() if proc.poll() is not None else "")
        # It holds the sealer lock with five links written and not committed.
        assert audit_seal() == services.SealResult(linked=0, busy=True)
        assert not AuditLink.objects.exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert audit_seal_all() == 12  # waits for PostgreSQL to roll the dead sealer back
    _assert_each_event_linked_once_in_order()
    verified()


def _seal_until_one_can_link(timeout: float = 90.0) -> None:
    """Wait until the events written so far are below every open transaction on the server."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        cursor.execute("SELECT max(xid)::text FROM audit_auditevent")
        newest = int(cursor.fetchone()[0])
        while True:
            cursor.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            if int(cursor.fetchone()[0]) > newest:
                return
            assert time.monotonic() < deadline, "a transaction open on the server holds sealing back"
            time.sleep(0.05)


def test_a_sealer_failing_mid_batch_rolls_back_its_links(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(6):
        audit_record(event="token.issued", actor=f"agent:{i}")
    _seal_until_one_can_link()

    def fail_after_the_links_are_written(head: AuditHead, lags: list[float]) -> None:
        assert AuditLink.objects.count() == 6  # inside the batch: written, not committed
        raise RuntimeError("sealer died mid-batch")

    monkeypatch.setattr(services, "_observe_lag", fail_after_the_links_are_written)
    with pytest.raises(RuntimeError, match="mid-batch"):
        audit_seal()
    assert not AuditLink.objects.exists()
    assert not AuditHead.objects.filter(seq__gt=0).exists()  # the head rolled back with the links
    monkeypatch.undo()
    assert audit_seal_all() == 6
    _assert_each_event_linked_once_in_order()
    verified()


def test_seal_lag_is_a_histogram_in_metrics(client: Client) -> None:
    for i in range(3):
        audit_record(event="token.issued", actor=f"agent:{i}")
    _seal_until_all_linked()
    head = AuditHead.objects.get(pk=1)
    assert head.lag_count == 3 and sum(head.lag_buckets) == 3
    body = client.get("/metrics").content.decode()
    assert "# TYPE countersign_audit_seal_lag_seconds histogram" in body
    assert 'countersign_audit_seal_lag_seconds_bucket{le="+Inf"} 3.0' in body
    assert "countersign_audit_seal_lag_seconds_count 3.0" in body


def test_readyz_names_the_audit_sealer_when_an_event_waits_too_long(client: Client) -> None:
    assert client.get("/readyz").status_code == 200
    with time_machine.travel(timezone.now() - timedelta(minutes=2), tick=False):
        audit_record(event="token.issued", actor="agent:left-waiting")
    response = client.get("/readyz")
    assert response.status_code == 503
    check = response.json()["checks"]["audit_sealer"]
    assert check["status"] == "down" and "audit sealer" in check["error"]
    _seal_until_all_linked()
    assert client.get("/readyz").status_code == 200


def test_the_sealer_process_links_events_as_they_commit_and_stops_on_sigterm(db: None) -> None:
    env = {**os.environ, "DATABASE_URL": _database_url(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "audit_seal", "--loop", "--interval", "0.05"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        rows = [audit_record(event="token.issued", actor=f"agent:{i}") for i in range(5)]
        _until(lambda: AuditLink.objects.count() == 5, "the sealer process did not link the events")
        assert sorted(AuditLink.objects.values_list("event_id", flat=True)) == [r.pk for r in rows]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    verified()

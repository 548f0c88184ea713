"""Group commit: events written outside any transaction share one INSERT when they arrive together.

A refusal is audited outside the refused operation's transaction (``audit.services``), so on
PostgreSQL each one was an INSERT of its own, committed on its own. Under a race or a flood of
bad requests, many request threads of one process write such rows at the same moment; each paid
the statement's round trip, its commit and the index updates of a one-row insert (measured
during ``bench/approval_roundtrip.py``'s race: ~0.27 ms of PostgreSQL CPU per refusal, 45 % of
PostgreSQL's CPU, against ~0.05 ms a row in a multi-row INSERT).

How it goes (leader and followers, as PostgreSQL's own WAL group commit): a thread that finds no
write in progress writes its event at once, alone (no wait when nothing else is happening). A
thread that arrives while a write is in progress queues its event and waits. When the write ends,
its writer hands over to the oldest waiting thread, which writes every event queued by then (up
to ``MAX_ROWS``) in one INSERT on its own connection, and so on. Every caller returns only once its
own row is committed, with that row's id and transaction, exactly as a lone INSERT would; nothing
is written later or in the background, so nothing can be lost with the process.

A batch that PostgreSQL refuses because of one row (bad data, a constraint) is written again row
by row, so only the caller of the bad row gets the error; an error of the connection or the server
reaches every caller of the batch, as it would have reached each of them alone.
"""

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

from django.db import DataError, IntegrityError

# The most events one INSERT carries; a longer queue is written in several, one after another.
MAX_ROWS = 100

Fields = dict[str, Any]
Written = tuple[int, int]  # the event's id and the id of the transaction that wrote it


class _Slot:
    __slots__ = ("fields", "done", "lead", "written", "error")

    def __init__(self, fields: Fields) -> None:
        self.fields = fields
        self.done: threading.Event | None = None  # made only for a caller that waits (a leader never does)
        self.lead = False  # woken to write the queue, not because its row was written
        self.written: Written | None = None
        self.error: BaseException | None = None

    def outcome(self) -> Written:
        if self.error is not None:
            raise self.error
        assert self.written is not None  # every slot a write took has one or the other
        return self.written


class GroupCommit:
    """One process's queue of events waiting for an INSERT (module docstring).

    ``write`` INSERTs the events it is given in one statement, outside any transaction, on the
    calling thread's connection, and returns their ids and transaction in the same order.
    """

    def __init__(self, write: Callable[[Sequence[Fields]], list[Written]], max_rows: int = MAX_ROWS) -> None:
        self._write = write
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._writing = False
        self.statements = 0  # INSERTs sent (for tests and benchmarks)

    def append(self, fields: Fields) -> Written:
        slot = _Slot(fields)
        with self._lock:
            self._queue.append(slot)
            leads = not self._writing
            self._writing = True
            if not leads:
                done = slot.done = threading.Event()
        if not leads:
            done.wait()
            if not slot.lead:
                return slot.outcome()
        # This thread writes: its own slot is the oldest queued (a new leader's, or a handed-over one).
        with self._lock:
            batch = self._queue[: self.max_rows]
            del self._queue[: self.max_rows]
        try:
            self._write_batch(batch)
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]  # queued while this write ran: it waits
                    successor.lead = True
                    _wake(successor)
                else:
                    self._writing = False
        return slot.outcome()

    def _write_batch(self, batch: list[_Slot]) -> None:
        try:
            self._written(batch, self._write([s.fields for s in batch]))
        except (DataError, IntegrityError) as exc:
            if len(batch) == 1:
                self._failed(batch, exc)
            else:  # one row is bad: the others are written, each alone, and only its caller hears of it
                for slot in batch:
                    try:
                        self._write_batch([slot])
                    except BaseException:  # noqa: BLE001, S112 - that slot holds its error; the rest still go
                        continue
        except BaseException as exc:
            self._failed(batch, exc)
            raise

    def _written(self, batch: list[_Slot], written: list[Written]) -> None:
        self.statements += 1
        for slot, row in zip(batch, written, strict=True):
            slot.written = row
            _wake(slot)

    @staticmethod
    def _failed(batch: list[_Slot], exc: BaseException) -> None:
        for i, slot in enumerate(batch):
            # Each waiting caller raises an exception object of its own (a traceback is per raise).
            slot.error = exc if i == 0 else copy.copy(exc)
            _wake(slot)


def _wake(slot: _Slot) -> None:
    if slot.done is not None:
        slot.done.set()

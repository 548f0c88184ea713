"""Writing to, sealing and checking the audit chain: lock-free appends, one sealer.

State
    ``AuditEvent``  one row per event, INSERTed by whoever acts, inside its own
                    transaction, with the id of that transaction (``xid``, from
                    ``pg_current_xact_id()``). Never updated, never deleted.
    ``AuditLink``   one row per sealed event: ``seq`` (its position, the primary
                    key), ``event_id`` (unique), ``prev_hash``, ``hash`` (SHA-256
                    over the JCS form of the event's content, ``seq`` and
                    ``prev_hash``). INSERTed by the sealer only. Never updated,
                    never deleted.
    ``AuditHead``   one row, the sealer's own: the newest ``seq``/``hash`` (so a
                    removed tail is noticed), ``floor`` (every event written by a
                    transaction below it is linked: where the next search starts)
                    and the cumulative seal-lag histogram for ``/metrics``.
    On PostgreSQL a trigger refuses UPDATE and DELETE on events and links.

Who writes which row
    A writer does one INSERT into ``AuditEvent`` and takes no shared lock, so
    audited writes in different transactions never wait for each other. A
    refusal must be recorded although the refused operation rolls back, so
    callers record refusals outside the refused operation's transaction.
    Events written outside any transaction at the same moment by threads of
    one process share one INSERT (``audit.grouped``, group commit); each
    caller still returns only once its own row is committed.

    The sealer (``audit_seal``; ``manage.py audit_seal --loop`` runs it as its own
    process) takes the transaction-scoped advisory lock ``SEALER_LOCK``, then in
    that one transaction reads the head and the newest checkpoint, selects a
    batch, INSERTs its links (with their RFC 9162 leaf hashes) in one statement,
    the tree nodes the batch completed in another (``audit.merkle``), signs and
    INSERTs one checkpoint (``audit.ledger``) and updates the head. One sealer at
    a time across all nodes; per batch a bounded number of statements, ``O(batch
    + log n)`` hashes and one signature.

Refusing to seal over a broken ledger
    Before it links anything the sealer checks that its head (size and frontier)
    is the tree the newest checkpoint signed. If not (rows removed or rewritten
    underneath it), it links nothing, logs why, and ``/readyz`` turns red as
    events wait: signing on top would bless the damage. ``audit_verify`` says
    where it is.

Ordering rule
    An event is linked only when every transaction that could still write an
    event ordered before it has ended: its ``xid`` is below the ``xmin`` of the
    sealer's own snapshot (``pg_snapshot_xmin(pg_current_snapshot())``, the
    oldest transaction still running). Every event below ``xmin`` is committed
    and visible to that snapshot, or never will be; so a batch is taken in
    ``(xid, id)`` order from ``floor`` up, nothing is skipped, and an event whose
    transaction began early and commits late waits for its turn instead of
    being passed over. Afterwards ``floor`` moves to that same snapshot's
    ``xmin`` (or to the last linked ``xid`` when the batch was cut short by its
    size). ``xmin`` is cluster-wide: a transaction left open anywhere on the
    server holds sealing back (and ``/readyz`` says so); keep
    ``idle_in_transaction_session_timeout`` set.

    A seal run inside a transaction that wrote events itself (tests do this;
    ``audit_verify`` inside one) links that transaction's own events too, after
    the safe ones: they are visible to it and commit or roll back with their
    links. ``floor`` never passes ``xmin`` then, so events of an older
    transaction still running are found later, only linked after these.

Races
    Two sealers at once: the second does not get the advisory lock and links
    nothing (``busy``); a waiting one (``wait=True``) takes it after the first
    commits, and in READ COMMITTED its next statement sees the first one's links
    and head. A sealer killed or failing mid-batch: its transaction rolls back,
    links and head together, and the next sealer does that batch again. Should
    two sealers ever both write, the primary key on ``seq`` and the unique
    ``event_id`` refuse the second: nothing is linked twice.

SQLite (the laptop default) has no transaction ids and runs IMMEDIATE
transactions, which serialise writers anyway: there ``audit_record`` links its
event before returning, in the writer's transaction.
"""

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, ParamSpec, cast

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import Field
from django.db.models.base import ModelState
from django.http import HttpRequest
from django.utils import timezone

from .grouped import GroupCommit
from .jcs import dumps as jcs_dumps
from .keys import ledger_signer
from .ledger import checkpoint_published, checkpoint_sign, event_fields, event_leaf
from .merkle import frontier_append, frontier_root, insert_nodes
from .models import AuditCheckpoint, AuditEvent, AuditHead, AuditLink
from .signals import event_built

log = logging.getLogger("audit.sealer")

P = ParamSpec("P")

GENESIS = "0" * 64
SEALER_LOCK = int.from_bytes(b"cs-audit", "big", signed=True)  # pg advisory lock key, any fixed bigint
SEAL_BATCH = 1000
# Upper bounds (seconds) of the seal-lag histogram buckets; the goal is p99 under 2 s.
SEAL_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)


def _event_hash(*, seq: int, occurred_at: str, fields: dict[str, Any], prev_hash: str) -> str:
    body = {"seq": seq, "occurred_at": occurred_at, "prev_hash": prev_hash, **fields}
    return hashlib.sha256(jcs_dumps(body)).hexdigest()


def _link_hash(event: AuditEvent, *, seq: int, prev_hash: str) -> str:
    return _event_hash(
        seq=seq, occurred_at=event.occurred_at.isoformat(), fields=event_fields(event), prev_hash=prev_hash
    )


@cache
def _deferred_sealing() -> bool:
    """PostgreSQL: writers append, the sealer links (read once: each ``connection.vendor`` is a
    thread-local lookup)."""
    return connections[DEFAULT_DB_ALIAS].vendor == "postgresql"


def client_ip(request: HttpRequest | None) -> str:
    if request is None:
        return ""
    meta = getattr(request, "META", None) or {}
    return str(meta.get("REMOTE_ADDR", ""))[:64]


_APPEND_COLUMNS = (
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
)


def _column(name: str) -> str:
    """The column of one of AuditEvent's concrete fields."""
    return cast(str, cast("Field[Any, Any]", AuditEvent._meta.get_field(name)).column)


@cache
def _append_sql() -> str:
    quote = connection.ops.quote_name
    table = quote(AuditEvent._meta.db_table)
    cols = ", ".join(quote(_column(c)) for c in _APPEND_COLUMNS)
    return (
        f"INSERT INTO {table} ({cols}, {quote('xid')}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s,"
        f" pg_current_xact_id()) RETURNING {quote('id')}, {quote('xid')}::text"
    )


# How a writer gets a cursor for one statement: Django's own, unless an app above hands down a
# cheaper one (``register_statement_cursor``).
_statement_cursor: Callable[[str], AbstractContextManager[Any]] = lambda sql: connection.cursor()  # noqa: E731


def register_statement_cursor(factory: Callable[[str], AbstractContextManager[Any]]) -> None:
    """Write events through ``factory(sql)``: a context manager giving a DB-API cursor for ``sql``.

    ``consent`` hands down ``consent.rows.cursor``, the connection's kept server-binding cursor of
    that statement; through Django's cursor wrapper and a new driver cursor per event, the INSERT
    was ~440,000 instructions, four fifths of a refusal's audit (callgrind, 500 ``audit_refusal``).
    Whatever it returns must show the statement to Django's query log and execute wrappers as any
    other (``rows.cursor`` falls back to Django's cursor while they are on).
    """
    global _statement_cursor
    _statement_cursor = factory


@cache
def _append_many_sql(rows: int) -> str:
    """``_append_sql`` for ``rows`` events in one INSERT (ids and transaction in VALUES order)."""
    head, _, tail = _append_sql().partition(" VALUES ")
    values, _, returning = tail.rpartition(" RETURNING ")
    return f"{head} VALUES {', '.join([values] * rows)} RETURNING {returning}"


def _append_params(fields: dict[str, Any]) -> list[Any]:
    return [
        *(fields[name] for name in _APPEND_COLUMNS[:-2]),
        _detail_json(fields["detail"]),
        fields["remote_addr"],
    ]


def _append(fields: dict[str, Any]) -> tuple[int, int]:
    """The writer's one statement on PostgreSQL, written out: an audited request pays for the INSERT,
    not for building it through the ORM (~1 ms of CPU per event, measured in bench/inprocess.py).
    ``fields`` as ``PendingEvent.fields``; returns the event's id and writing transaction."""
    sql = _append_sql()
    with _statement_cursor(sql) as cursor:
        cursor.execute(sql, _append_params(fields))
        pk, xid = cursor.fetchone()
    return pk, int(xid)


def _append_many(batch: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """Several events outside any transaction, one INSERT (``audit.grouped``)."""
    if len(batch) == 1:
        return [_append(batch[0])]
    sql = _append_many_sql(len(batch))
    with _statement_cursor(sql) as cursor:
        cursor.execute(sql, [param for fields in batch for param in _append_params(fields)])
        return [(pk, int(xid)) for pk, xid in cursor.fetchall()]


# Events written outside any transaction share INSERTs when they arrive together (refusals, mostly).
_GROUPED = GroupCommit(_append_many)


def _appended(fields: dict[str, Any], pk: int, xid: int) -> AuditEvent:
    """The row ``_append`` wrote, as the instance ``Model.from_db`` would make, without running
    ``Model.__init__`` over every field (~56,000 instructions an event): ``fields`` are attribute
    values already, and ``AuditEvent`` adds nothing to ``__init__``."""
    row = AuditEvent.__new__(AuditEvent)
    state = row._state = ModelState()
    state.adding, state.db = False, DEFAULT_DB_ALIAS
    row.__dict__.update(fields)
    row.id, row.xid = pk, xid
    return row


# json.dumps(detail, cls=DjangoJSONEncoder) without a new encoder per event (~56,000 instructions).
_DETAIL_ENCODER = DjangoJSONEncoder()


def _detail_json(detail: dict[str, Any]) -> str:
    return _DETAIL_ENCODER.encode(detail)


@dataclass
class PendingEvent:
    """An audit event that another statement writes: ``consent.rows.Batch`` makes it part of its one
    statement on PostgreSQL (so it commits, or not, with what it records), or calls ``append``.

    ``fields`` are the columns a writer sets (``_APPEND_COLUMNS``); the model instance is made only
    when something needs one (``append``, or a reader of ``row``): a token request's event goes
    into its statement from ``fields`` alone, and a model's ``__init__`` was most of building it."""

    fields: dict[str, Any]
    model = AuditEvent

    @cached_property
    def row(self) -> AuditEvent:
        return AuditEvent(**self.fields)

    def values(self) -> dict[str, Any]:
        fields = self.fields
        return {name: fields[name] for name in _PENDING_VALUES}

    @property
    def sql(self) -> dict[str, tuple[str, list[Any]]]:
        return {
            "detail": ("%s::jsonb", [_detail_json(self.fields["detail"])]),
            "xid": ("pg_current_xact_id()", []),
        }

    def append(self) -> AuditEvent:
        return _save(self)

    def announce(self) -> None:
        """Send ``event_built`` for this event (see ``audit_event``'s ``announce``)."""
        f = self.fields
        event_built.send(AuditEvent, user_id=f["user_id"], client_id=f["client_id"], grant_id=f["grant_id"])


# What a Batch writes as plain values: every append column but ``detail`` (written as jsonb).
_PENDING_VALUES = (*_APPEND_COLUMNS[:-2], "remote_addr")


def audit_event(
    *,
    event: str,
    outcome: str = AuditEvent.Outcome.OK,
    actor: str = "",
    user_id: int | None = None,
    client_id: str = "",
    grant_id: Any = "",
    error: str = "",
    detail: dict[str, Any] | None = None,
    request: HttpRequest | None = None,
    announce: bool = True,
) -> PendingEvent:
    """One event, not yet written (arguments as ``audit_record``).

    ``announce=False``: whose it is (``event_built``, which request logs take their ids from) is
    told only by ``PendingEvent.announce``, for an event built before those ids are known to be true.
    """
    pending = PendingEvent(
        {
            "occurred_at": timezone.now(),
            "event": event,
            "outcome": outcome,
            "actor": actor[:200],
            "user_id": user_id,
            "client_id": (client_id or "")[:100],
            "grant_id": str(grant_id or ""),
            "error": error,
            "detail": detail or {},
            "remote_addr": client_ip(request),
        }
    )
    if announce:
        pending.announce()
    return pending


def _save(pending: PendingEvent) -> AuditEvent:
    if _deferred_sealing():
        # Outside a transaction an INSERT commits alone anyway: concurrent ones may as well share one.
        pk, xid = _append(pending.fields) if connection.in_atomic_block else _GROUPED.append(pending.fields)
        row = pending.__dict__.get("row")  # built already (``PendingEvent.row``): that instance, saved
        if row is None:
            row = pending.__dict__["row"] = _appended(pending.fields, pk, xid)
        else:
            row.pk, row.xid = pk, xid
            row._state.adding = False
        return row
    row = pending.row
    # Inside a caller's transaction the event commits or rolls back with it: no savepoint needed.
    with transaction.atomic(savepoint=False):
        row.save(force_insert=True)
        _seal_batch(limit=SEAL_BATCH, wait=True)
    return row


def _written(build: Callable[P, PendingEvent]) -> Callable[P, AuditEvent]:
    def audit_record(*args: P.args, **kwargs: P.kwargs) -> AuditEvent:
        """Append one event. Never pass a secret or a whole token in ``detail``.

        On PostgreSQL this is one INSERT and takes no lock another writer could wait
        for; the sealer links the event once its transaction (and every older one)
        has ended.
        """
        return _save(build(*args, **kwargs))

    return audit_record


audit_record = _written(audit_event)


def audit_refusal(*, event: str, error: str, **kwargs: Any) -> AuditEvent:
    return audit_record(event=event, outcome=AuditEvent.Outcome.REFUSED, error=error, **kwargs)


# --- the sealer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealResult:
    linked: int
    busy: bool = False  # another sealer held the lock; nothing was tried
    refused: str = ""  # the head is not the tree the newest checkpoint signed: why


# The events to link next, in chain order, with the frontier of this very statement's snapshot.
_CANDIDATES_PG = """
WITH frontier AS MATERIALIZED (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin, pg_current_xact_id_if_assigned() AS own
)
SELECT e.*, f.xmin::text AS frontier
FROM audit_auditevent e CROSS JOIN frontier f
WHERE e.xid >= %s::xid8
  AND (e.xid < f.xmin OR e.xid = f.own)
  AND NOT EXISTS (SELECT 1 FROM audit_auditlink l WHERE l.event_id = e.id)
ORDER BY e.xid, e.id
LIMIT %s
"""
# SQLite: writers are serialised and link their own events before commit, so everything
# unlinked comes after the newest link.
_CANDIDATES_SQLITE = """
SELECT e.*, 0 AS frontier
FROM audit_auditevent e
WHERE e.id > COALESCE((SELECT l.event_id FROM audit_auditlink l ORDER BY l.seq DESC LIMIT 1), 0)
  AND NOT EXISTS (SELECT 1 FROM audit_auditlink l WHERE l.event_id = e.id)
ORDER BY e.xid, e.id
LIMIT %s
"""


def _take_lock(wait: bool) -> bool:
    if connection.vendor != "postgresql":
        return True  # SQLite: the IMMEDIATE transaction already holds the database's write lock
    with connection.cursor() as cursor:
        if wait:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SEALER_LOCK])
            return True
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [SEALER_LOCK])
        return bool(cursor.fetchone()[0])


def _candidates(head: AuditHead, limit: int) -> list[AuditEvent]:
    if connection.vendor == "postgresql":
        return list(AuditEvent.objects.raw(_CANDIDATES_PG, [str(head.floor), limit]))
    return list(AuditEvent.objects.raw(_CANDIDATES_SQLITE, [limit]))


def _observe_lag(head: AuditHead, lags: list[float]) -> None:
    counts = list(head.lag_buckets) or [0] * len(SEAL_LAG_BUCKETS)
    for lag in lags:
        counts[next(i for i, bound in enumerate(SEAL_LAG_BUCKETS) if lag <= bound)] += 1
    head.lag_buckets = counts
    head.lag_sum += sum(lags)
    head.lag_count += len(lags)


def _state_problem(head: AuditHead, latest: AuditCheckpoint | None, frontier: list[bytes]) -> str:
    """Why the head is not the tree the newest checkpoint signed ('' when it is)."""
    if len(frontier) != head.seq.bit_count():
        return f"the sealer's frontier does not describe a tree of {head.seq} events"
    if latest is None:
        return ""  # nothing signed yet (a new ledger, or events sealed before checkpoints existed)
    if latest.tree_size != head.seq:
        return (
            f"the newest checkpoint signs {latest.tree_size} events and the sealer's head says {head.seq}: "
            "audit rows were removed or added underneath it"
        )
    if frontier_root(frontier).hex() != latest.root_hash:
        return f"the sealer's tree of {head.seq} events is not the one checkpoint {latest.tree_size} signed"
    return ""


def _checkpoint(head: AuditHead, latest: AuditCheckpoint | None, frontier: list[bytes]) -> AuditCheckpoint:
    cp = checkpoint_sign(tree_size=head.seq, root=frontier_root(frontier), prev=latest)
    cp.save(force_insert=True)
    checkpoint_published(cp)
    return cp


def _seal_batch(*, limit: int, wait: bool) -> SealResult:
    """Link up to ``limit`` events, in the caller's transaction. See the module docstring."""
    if not _take_lock(wait):
        return SealResult(linked=0, busy=True)
    # The lock serialises sealers; in READ COMMITTED this statement already sees the previous
    # sealer's committed head.
    head, _ = AuditHead.objects.get_or_create(pk=1)
    latest = AuditCheckpoint.objects.order_by("-tree_size").first()
    frontier = [bytes.fromhex(h) for h in head.frontier]
    problem = _state_problem(head, latest, frontier)
    if problem:
        log.error("audit sealer: not sealing: %s (run manage.py audit_verify)", problem)
        return SealResult(linked=0, refused=problem)
    events = _candidates(head, limit)
    if not events:
        if head.seq and latest is None:  # events sealed before checkpoints existed: sign them once
            _checkpoint(head, latest, frontier)
        return SealResult(linked=0)
    now = timezone.now()
    links, leaves, seq, prev_hash = [], [], head.seq, head.hash
    for event in events:
        seq += 1
        digest = _link_hash(event, seq=seq, prev_hash=prev_hash)
        leaf = event_leaf(event, seq)
        leaves.append(leaf)
        links.append(
            AuditLink(
                seq=seq, event_id=event.pk, prev_hash=prev_hash, hash=digest, leaf=leaf.hex(), sealed_at=now
            )
        )
        prev_hash = digest
    frontier, _, nodes = frontier_append(frontier, head.seq, leaves)
    AuditLink.objects.bulk_create(links)
    insert_nodes(nodes)
    frontier_text = [h.hex() for h in frontier]
    frontier_events = int(events[0].frontier)  # type: ignore[attr-defined]  # a column of the raw query
    if connection.vendor == "postgresql":
        head.floor = min(frontier_events, events[-1].xid) if len(events) == limit else frontier_events
    _observe_lag(head, [max(0.0, (now - e.occurred_at).total_seconds()) for e in events])
    head.seq, head.hash, head.sealed_at, head.frontier = seq, prev_hash, now, frontier_text
    _checkpoint(head, latest, frontier)
    head.save(
        update_fields=["seq", "hash", "floor", "sealed_at", "lag_buckets", "lag_sum", "lag_count", "frontier"]
    )
    return SealResult(linked=len(links))


def audit_seal(*, limit: int = SEAL_BATCH, wait: bool = False) -> SealResult:
    """Link one batch of committed events into the chain, in one transaction.

    ``wait=False`` (the looping sealer) returns ``busy`` at once if another sealer
    holds the lock; ``wait=True`` waits for it.
    """
    ledger_signer().active_key()  # a first key is created outside the sealer's transaction
    with transaction.atomic():
        return _seal_batch(limit=limit, wait=wait)


def audit_seal_all(*, limit: int = SEAL_BATCH) -> int:
    """Link everything that can be linked now, waiting for a running sealer. Returns how many."""
    total = 0
    while True:
        result = audit_seal(limit=limit, wait=True)
        total += result.linked
        if result.linked < limit:
            return total

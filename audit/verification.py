"""Checking the whole ledger: chain, leaves, tree, checkpoints, and copies kept elsewhere.

One pass over the sealed events in position order (``manage.py audit_verify``):

- the hash chain: positions without gaps, each link naming the one before, each event
  present and hashing to its link (edited, deleted or moved events);
- each event's RFC 9162 leaf hash recomputed from its content and position;
- the tree: roots recomputed from the leaves as they stream by (``audit.merkle``'s
  frontier), every stored subtree node compared with the one recomputed;
- every checkpoint: its signature (every key the server ever held), its claims equal to its
  row, its root equal to the recomputed root of its first ``tree_size`` leaves (so each is
  consistent with every checkpoint before it, RFC 9162 §2.1.4), its ``prev`` naming the
  checkpoint before it, and no sealed event left unsigned;
- the newest checkpoint against the event count: fewer events than it signs is truncation;
- checkpoints kept elsewhere (``--checkpoint FILE``, ``AUDIT_CHECKPOINT_FILE``): signature,
  size and root against the same recomputation.

Each finding names the first bad position it knows (``seq``, 1-based; leaf index ``seq - 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connection

from countersign.ledger import Checkpoint, LedgerError, checkpoint_digest, load_keys, verify_checkpoint
from countersign.rfc9162 import compact_root

from .ledger import event_leaf, server_jwks
from .merkle import frontier_append
from .models import AuditCheckpoint, AuditEvent, AuditHead, AuditLink, AuditNode
from .selectors import _unlinked
from .services import GENESIS, _link_hash

CHUNK = 2000


@dataclass(frozen=True)
class ChainBreak:
    seq: int | None
    reason: str

    def __str__(self) -> str:
        return f"position {self.seq}: {self.reason}" if self.seq is not None else self.reason


def _stored_nodes() -> Iterator[tuple[tuple[int, int], bytes]]:
    """Stored subtree nodes in the order the sealer completed them: by the leaf count that completed
    them, lower first."""
    table = connection.ops.quote_name(AuditNode._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT height, idx, hash FROM {table} ORDER BY (idx + 1) << height, height")
        while rows := cursor.fetchmany(CHUNK):
            for height, idx, digest in rows:
                yield (int(height), int(idx)), bytes.fromhex(digest)


def _completion(key: tuple[int, int]) -> tuple[int, int]:
    return (key[1] + 1) << key[0], key[0]


class _Walk:
    def __init__(self, kept: list[Checkpoint], jwks: dict[str, Any] | None):
        self.keys = load_keys(jwks if jwks is not None else server_jwks())
        self.prev_hash, self.expected = GENESIS, 1
        self.frontier: list[bytes] = []
        self.size = 0
        self.checkpoints = AuditCheckpoint.objects.order_by("tree_size").iterator(chunk_size=CHUNK)
        self.next_cp = next(self.checkpoints, None)
        self.prev_cp: AuditCheckpoint | None = None
        self.signed_size = 0
        self.kept = sorted(kept, key=lambda cp: cp.tree_size)
        self.nodes = _stored_nodes()
        self.next_node = next(self.nodes, None)

    def links(self, links: list[AuditLink]) -> Iterator[ChainBreak]:
        events = AuditEvent.objects.in_bulk([link.event_id for link in links])
        for link in links:
            if link.seq != self.expected:
                yield ChainBreak(self.expected, f"positions {self.expected}..{link.seq - 1} are missing")
            if link.prev_hash != self.prev_hash:
                yield ChainBreak(link.seq, "does not link to the one before it")
            event = events.get(link.event_id)
            if event is None:
                yield ChainBreak(link.seq, f"its event (id {link.event_id}) was removed")
            elif _link_hash(event, seq=link.seq, prev_hash=link.prev_hash) != link.hash:
                yield ChainBreak(link.seq, f"event {event.pk}: content does not match its hash (edited)")
            elif event_leaf(event, link.seq).hex() != link.leaf:
                yield ChainBreak(
                    link.seq,
                    f"event {event.pk}: content does not match its leaf hash "
                    "(edited, or moved here from another position)",
                )
            self.prev_hash, self.expected = link.hash, link.seq + 1
            try:
                leaf = bytes.fromhex(link.leaf)
            except ValueError:
                leaf = b""
            if len(leaf) != 32:
                yield ChainBreak(link.seq, "has no leaf hash")
                leaf = b"\0" * 32
            yield from self._append(leaf)

    def _append(self, leaf: bytes) -> Iterator[ChainBreak]:
        self.frontier, self.size, nodes = frontier_append(self.frontier, self.size, [leaf])
        for key, digest in ((node[:2], node[2]) for node in nodes):
            yield from self._node(key, digest)
        yield from self._due()

    def _node(self, key: tuple[int, int], digest: bytes) -> Iterator[ChainBreak]:
        first, last = key[1] << key[0], ((key[1] + 1) << key[0])
        while self.next_node is not None and _completion(self.next_node[0]) < _completion(key):
            yield self._extra_node(self.next_node[0])
            self.next_node = next(self.nodes, None)
        if self.next_node is None or self.next_node[0] != key:
            yield ChainBreak(first + 1, f"the stored tree lacks the node over positions {first + 1}..{last}")
            return
        if self.next_node[1] != digest:
            yield ChainBreak(
                first + 1,
                f"the stored tree node over positions {first + 1}..{last} does not match the leaves under it",
            )
        self.next_node = next(self.nodes, None)

    def _extra_node(self, key: tuple[int, int]) -> ChainBreak:
        first = key[1] << key[0]
        return ChainBreak(
            first + 1, f"a stored tree node (height {key[0]}, index {key[1]}) is not part of the tree"
        )

    def _due(self) -> Iterator[ChainBreak]:
        while self.next_cp is not None and self.next_cp.tree_size <= self.size:
            yield from self._checkpoint(self.next_cp)
            self.prev_cp, self.next_cp = self.next_cp, next(self.checkpoints, None)
        while self.kept and self.kept[0].tree_size <= self.size:
            kept = self.kept.pop(0)
            if kept.tree_size == self.size and compact_root(self.frontier) != kept.root_hash:
                yield ChainBreak(
                    None,
                    f"the checkpoint kept elsewhere (tree_size {kept.tree_size}) does not match "
                    f"the ledger's first {kept.tree_size} events: rewritten since",
                )

    def _checkpoint(self, cp: AuditCheckpoint) -> Iterator[ChainBreak]:
        start = (self.prev_cp.tree_size if self.prev_cp else 0) + 1
        name = f"checkpoint {cp.tree_size}"
        try:
            signed = verify_checkpoint(cp.jws, self.keys)
        except LedgerError as exc:
            yield ChainBreak(start, f"{name}: {exc.description}")
            return
        if signed.tree_size != cp.tree_size or signed.root_hash.hex() != cp.root_hash:
            yield ChainBreak(start, f"{name}: its row does not match what it signs")
        if signed.tree_size == self.size and compact_root(self.frontier) != signed.root_hash:
            yield ChainBreak(
                start,
                f"{name}: the events at positions {start}..{cp.tree_size} do not hash to its "
                "signed root (changed, moved or inserted)",
            )
        expected = (
            None
            if self.prev_cp is None
            else (self.prev_cp.tree_size, self.prev_cp.root_hash, checkpoint_digest(self.prev_cp.jws))
        )
        actual = (
            None
            if signed.prev_tree_size is None
            else (signed.prev_tree_size, (signed.prev_root_hash or b"").hex(), signed.prev_digest)
        )
        if actual != expected:
            yield ChainBreak(
                start,
                f"{name}: does not follow the checkpoint before it "
                f"(it names {actual[0] if actual else 'none'}; a checkpoint was removed?)",
            )
        self.signed_size = cp.tree_size

    def finish(self) -> Iterator[ChainBreak]:
        remaining = list(self.checkpoints) + ([self.next_cp] if self.next_cp else [])
        if remaining:
            newest = max(remaining, key=lambda cp: cp.tree_size)
            yield ChainBreak(
                self.size + 1,
                f"checkpoint {newest.tree_size} signs {newest.tree_size} events and the "
                f"ledger holds {self.size}: events were removed (truncated)",
            )
        elif self.size > self.signed_size:
            why = (
                "inserted? (events sealed before checkpoints existed are signed by the sealer's next run)"
                if self.prev_cp is None
                else "inserted?"
            )
            yield ChainBreak(
                self.signed_size + 1,
                f"positions {self.signed_size + 1}..{self.size} are signed by no checkpoint ({why})",
            )
        for kept in self.kept:
            yield ChainBreak(
                self.size + 1,
                f"the checkpoint kept elsewhere signs {kept.tree_size} events and the "
                f"ledger holds {self.size}: events were removed (truncated)",
            )
        while self.next_node is not None:
            yield self._extra_node(self.next_node[0])
            self.next_node = next(self.nodes, None)
        head = AuditHead.objects.filter(pk=1).first()
        if head is not None and (head.seq != self.expected - 1 or head.hash != self.prev_hash):
            yield ChainBreak(head.seq, "the newest links were removed (chain head does not match)")
        elif head is not None and head.frontier != [h.hex() for h in self.frontier]:
            yield ChainBreak(None, "the sealer's frontier does not match the tree")


def audit_chain_breaks(
    *, kept: Sequence[Checkpoint] = (), jwks: dict[str, Any] | None = None
) -> Iterator[ChainBreak]:
    """Walk the ledger in order; yield every place where it does not hold (see the module docstring)."""
    walk = _Walk(list(kept), jwks)
    yield from walk._due()  # a checkpoint of size 0 (never written) or kept ones of size 0
    chunk: list[AuditLink] = []
    for link in AuditLink.objects.order_by("seq").iterator(chunk_size=CHUNK):
        chunk.append(link)
        if len(chunk) == CHUNK:
            yield from walk.links(chunk)
            chunk = []
    yield from walk.links(chunk)
    yield from walk.finish()
    for pk in _unlinked(recent=False).order_by("id").values_list("pk", flat=True)[:1000]:
        yield ChainBreak(None, f"event {pk} is not in the chain (its link was removed)")
    for check in _EXTRA_CHECKS:
        yield from check()


# Checks of other apps' records that only hold if no event was removed, handed in at start-up
# (``register_check``; consent registers one for its session grants): audit imports no other app.
_EXTRA_CHECKS: list[Callable[[], Iterable[ChainBreak]]] = []


def register_check(check: Callable[[], Iterable[ChainBreak]]) -> None:
    """Have ``audit_verify`` also run ``check`` (once per process, however often this is called)."""
    if check not in _EXTRA_CHECKS:
        _EXTRA_CHECKS.append(check)


def kept_checkpoint(jws: str, jwks: dict[str, Any] | None = None) -> Checkpoint:
    """A checkpoint kept elsewhere, checked with our keys (any issuer name we signed under: the
    issuer may have moved since; the keys have not)."""
    return verify_checkpoint(jws, load_keys(jwks if jwks is not None else server_jwks()))

"""The audit ledger's Merkle tree (RFC 9162 §2.1) as the database keeps it.

Leaf ``i`` (0-based) is the event sealed at position ``seq = i + 1``: its leaf hash, ``HASH(0x00 ||
JCS(event))`` (``countersign.ledger.event_leaf_data``), is stored on its ``AuditLink``. The
sealer also keeps

- the *frontier* (``AuditHead.frontier``): the roots of the perfect subtrees that make up the
  tree, largest first, one per set bit of its size. Appending a leaf merges equal-sized
  subtrees, so a batch of ``b`` leaves costs ``b`` leaf hashes and fewer than ``b + log n``
  node hashes, and the root is a fold of at most ``log n`` hashes (``compact_root``);
- every perfect subtree whose height is a multiple of ``STRIDE`` (``AuditNode``: height,
  index), one row per ``2**STRIDE`` leaves. Any perfect subtree is then at most
  ``2**(STRIDE - 1)`` stored hashes away, so a proof reads ``O(log n)`` rows in two statements
  and hashes ``O(2**STRIDE * log n)``, whatever the tree's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from django.db import connection

from countersign.rfc9162 import (
    compact_root,
    consistency_proof,
    inclusion_proof,
    largest_power_of_two_below,
    node_hash,
)

from .models import AuditLink, AuditNode

STRIDE = 4


def frontier_levels(size: int) -> list[int]:
    """The heights of the frontier's subtrees, largest first: the set bits of ``size``."""
    return [bit for bit in range(size.bit_length() - 1, -1, -1) if size >> bit & 1]


def frontier_append(
    frontier: list[bytes], size: int, leaves: Iterable[bytes]
) -> tuple[list[bytes], int, list[tuple[int, int, bytes]]]:
    """Append leaves to the tree ``frontier`` of ``size`` leaves.

    Returns the new frontier and size, and the perfect subtrees completed on the way whose
    height is a multiple of ``STRIDE`` (height, index, hash), to store.
    """
    stack = list(zip(frontier_levels(size), frontier, strict=True))
    nodes: list[tuple[int, int, bytes]] = []
    for leaf in leaves:
        size += 1
        stack.append((0, leaf))
        while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
            (height, right), (_, left) = stack.pop(), stack.pop()
            height += 1
            merged = node_hash(left, right)
            stack.append((height, merged))
            if height % STRIDE == 0:
                nodes.append((height, (size >> height) - 1, merged))
    return [h for _, h in stack], size, nodes


def frontier_root(frontier: list[bytes]) -> bytes:
    return compact_root(frontier)


class StoredTree:
    """Subtree hashes of the stored tree, fetched in two statements per proof.

    ``plan`` first collects every perfect subtree a proof will ask for (dry run), then one
    query reads the stored hashes those need (leaves from ``AuditLink``, higher subtrees from
    ``AuditNode``), and the proof is built from memory.
    """

    def __init__(self) -> None:
        self._perfect: dict[tuple[int, int], bytes] = {}

    def _ranges(self, start: int, end: int, out: set[tuple[int, int]]) -> None:
        while True:
            width = end - start
            if width & (width - 1) == 0:
                out.add((width.bit_length() - 1, start // width))
                return
            k = largest_power_of_two_below(width)
            out.add(((k.bit_length() - 1), start // k))
            start += k

    def subtree(self, start: int, end: int) -> bytes:
        """``MTH(D[start:end])``: every range a proof asks for starts at a multiple of a power of two
        that covers it, so it is one perfect subtree, or one and the subtree right of it."""
        width = end - start
        if width & (width - 1) == 0:
            return self._perfect[(width.bit_length() - 1, start // width)]
        k = largest_power_of_two_below(width)
        return node_hash(self._perfect[((k.bit_length() - 1), start // k)], self.subtree(start + k, end))

    def load(self, wanted: set[tuple[int, int]]) -> None:
        leaves: set[int] = set()
        stored: set[tuple[int, int]] = set()
        for height, index in wanted:
            base = height - height % STRIDE
            span = 1 << (height - base)
            for i in range(index * span, (index + 1) * span):
                if base == 0:
                    leaves.add(i)
                else:
                    stored.add((base, i))
        hashes: dict[tuple[int, int], bytes] = {}
        if leaves:
            for seq, leaf in AuditLink.objects.filter(seq__in=[i + 1 for i in leaves]).values_list(
                "seq", "leaf"
            ):
                hashes[(0, seq - 1)] = bytes.fromhex(leaf)
        if stored:
            hashes.update(_stored_nodes(stored))
        for height, index in wanted:
            self._perfect[(height, index)] = _combine(hashes, height, index)

    def _collector(self, wanted: set[tuple[int, int]]) -> Callable[[int, int], bytes]:
        """A subtree function that only notes which stored ranges a proof needs (``wanted``)."""

        def note(start: int, end: int) -> bytes:
            self._ranges(start, end, wanted)
            return b""

        return note

    def inclusion(self, index: int, size: int) -> list[bytes]:
        wanted: set[tuple[int, int]] = set()
        inclusion_proof(index, size, self._collector(wanted))
        self.load(wanted)
        return inclusion_proof(index, size, self.subtree)

    def consistency(self, first: int, second: int) -> list[bytes]:
        wanted: set[tuple[int, int]] = set()
        consistency_proof(first, second, self._collector(wanted))
        self.load(wanted)
        return consistency_proof(first, second, self.subtree)


def _stored_nodes(wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    table = connection.ops.quote_name(AuditNode._meta.db_table)
    pairs = sorted(wanted)
    placeholders = ", ".join(["(%s, %s)"] * len(pairs))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT height, idx, hash FROM {table} WHERE (height, idx) IN ({placeholders})",
            [v for pair in pairs for v in pair],
        )
        return {(h, i): bytes.fromhex(digest) for h, i, digest in cursor.fetchall()}


def _combine(hashes: dict[tuple[int, int], bytes], height: int, index: int) -> bytes:
    """A perfect subtree from the stored ones at the height of a multiple of ``STRIDE`` below it."""
    base = height - height % STRIDE
    level = [hashes[(base, i)] for i in range(index << (height - base), (index + 1) << (height - base))]
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def insert_nodes(nodes: list[tuple[int, int, bytes]]) -> None:
    """One statement for a batch's completed subtrees (the sealer's)."""
    if not nodes:
        return
    table = connection.ops.quote_name(AuditNode._meta.db_table)
    placeholders = ", ".join(["(%s, %s, %s)"] * len(nodes))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (height, idx, hash) VALUES {placeholders}",
            [v for h, i, digest in nodes for v in (h, i, digest.hex())],
        )

"""RFC 9162 §2.1 trees and proofs in ``countersign.rfc9162``, against an independent recompute.

The reference below is written straight from the RFC's recursive definitions, on lists, with
its own hashing; the package's proofs must equal it, verify with the RFC's iterative
algorithms, and fail when any byte changes.
"""

import hashlib
from collections.abc import Callable, Iterator

import pytest

from audit.merkle import STRIDE, frontier_append
from countersign.rfc9162 import (
    EMPTY_ROOT,
    compact_root,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    verify_consistency,
    verify_inclusion,
)

# The test inputs of Certificate Transparency's reference implementation, and the roots it lists
# for the trees over their first 1..8 entries.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes], leaf: bool = False) -> bytes:
    """MTH over entries, or (``leaf``) over entries that are leaf hashes already."""
    if not d:
        return _h(b"")
    if len(d) == 1:
        return d[0] if leaf else _h(b"\x00" + d[0])
    k = _k(len(d))
    return _h(b"\x01" + ref_mth(d[:k], leaf) + ref_mth(d[k:], leaf))


def ref_path(m: int, d: list[bytes], leaf: bool = False) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return ref_path(m, d[:k], leaf) + [ref_mth(d[k:], leaf)]
    return ref_path(m - k, d[k:], leaf) + [ref_mth(d[:k], leaf)]


def ref_subproof(m: int, d: list[bytes], b: bool, leaf: bool = False) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d, leaf)]
    k = _k(n)
    if m <= k:
        return ref_subproof(m, d[:k], b, leaf) + [ref_mth(d[k:], leaf)]
    return ref_subproof(m - k, d[k:], False, leaf) + [ref_mth(d[:k], leaf)]


DATA = [f"entry {i}".encode() for i in range(40)]
LEAVES = [leaf_hash(d) for d in DATA]


def _source(leaves: list[bytes]) -> Callable[[int, int], bytes]:
    return lambda start, end: merkle_root(leaves[start:end])


def _flips(value: bytes) -> Iterator[bytes]:
    for i in range(len(value)):
        yield value[:i] + bytes([value[i] ^ 0x01]) + value[i + 1 :]


def test_the_reference_implementations_roots() -> None:
    for n in range(1, 9):
        assert merkle_root([leaf_hash(d) for d in CT_LEAVES[:n]]).hex() == CT_ROOTS[n - 1]
        assert ref_mth(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]
    assert merkle_root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("n", range(1, 41))
def test_root_matches_the_recursive_definition_and_the_frontier(n: int) -> None:
    expected = ref_mth(DATA[:n])
    assert merkle_root(LEAVES[:n]) == expected
    frontier: list[bytes] = []
    size = 0
    for start in range(0, n, 3):  # appended in batches, as the sealer does
        frontier, size, _ = frontier_append(frontier, size, LEAVES[start : min(n, start + 3)])
    assert size == n and compact_root(frontier) == expected


def test_the_frontier_emits_every_subtree_at_a_stride_height_once() -> None:
    _, _, nodes = frontier_append([], 0, LEAVES[:40])
    expected = [
        (h, i)
        for end in range(1, 41)
        for h in range(STRIDE, 7, STRIDE)
        for i in [end // (1 << h) - 1]
        if end % (1 << h) == 0
    ]
    assert [(h, i) for h, i, _ in nodes] == expected
    for h, i, digest in nodes:
        assert digest == ref_mth(DATA[i << h : (i + 1) << h])


@pytest.mark.parametrize("n", range(1, 34))
def test_inclusion_proofs_equal_the_definition_and_verify(n: int) -> None:
    root = ref_mth(DATA[:n])
    for m in range(n):
        path = inclusion_proof(m, n, _source(LEAVES[:n]))
        assert path == ref_path(m, DATA[:n])
        assert verify_inclusion(m, n, LEAVES[m], path, root)
        assert not verify_inclusion(m, n, LEAVES[(m + 1) % n], path, root) or n == 1
        assert not verify_inclusion(m + 1, n, LEAVES[m], path, root)
        assert not verify_inclusion(m, n, LEAVES[m], path + [LEAVES[0]], root)
        if path:
            assert not verify_inclusion(m, n, LEAVES[m], path[:-1], root)


def test_inclusion_fails_when_any_byte_changes() -> None:
    n, m = 13, 6
    path = inclusion_proof(m, n, _source(LEAVES[:n]))
    root = merkle_root(LEAVES[:n])
    assert verify_inclusion(m, n, LEAVES[m], path, root)
    for forged in _flips(LEAVES[m]):
        assert not verify_inclusion(m, n, forged, path, root)
    for forged in _flips(root):
        assert not verify_inclusion(m, n, LEAVES[m], path, forged)
    for j, element in enumerate(path):
        for forged in _flips(element):
            assert not verify_inclusion(m, n, LEAVES[m], path[:j] + [forged] + path[j + 1 :], root)


@pytest.mark.parametrize("n", range(1, 34))
def test_consistency_proofs_equal_the_definition_and_verify(n: int) -> None:
    second_root = ref_mth(DATA[:n])
    for m in range(1, n + 1):
        proof = consistency_proof(m, n, _source(LEAVES[:n]))
        assert proof == ref_subproof(m, DATA[:n], True)
        first_root = ref_mth(DATA[:m])
        assert verify_consistency(m, n, first_root, second_root, proof)
        if m < n:
            assert not verify_consistency(m, n, ref_mth(DATA[1 : m + 1]), second_root, proof)
            assert not verify_consistency(m, n, first_root, ref_mth(DATA[1 : n + 1]), proof)
            assert not verify_consistency(m, n, first_root, second_root, proof[:-1])
    assert verify_consistency(0, n, EMPTY_ROOT, second_root, [])


def test_consistency_fails_when_any_byte_changes() -> None:
    m, n = 7, 29
    proof = consistency_proof(m, n, _source(LEAVES[:n]))
    first, second = merkle_root(LEAVES[:m]), merkle_root(LEAVES[:n])
    assert verify_consistency(m, n, first, second, proof)
    for forged in _flips(first):
        assert not verify_consistency(m, n, forged, second, proof)
    for forged in _flips(second):
        assert not verify_consistency(m, n, first, forged, proof)
    for j, element in enumerate(proof):
        for forged in _flips(element):
            assert not verify_consistency(m, n, first, second, proof[:j] + [forged] + proof[j + 1 :])


def test_a_rewritten_history_is_not_consistent() -> None:
    m, n = 8, 20
    rewritten = LEAVES[:3] + [leaf_hash(b"forged")] + LEAVES[4:n]
    proof = consistency_proof(m, n, _source(rewritten))
    assert not verify_consistency(m, n, merkle_root(LEAVES[:m]), merkle_root(rewritten), proof)

"""Checking Countersign's audit ledger offline: signed checkpoints, inclusion and consistency proofs.

The server keeps its audit events as the leaves of an RFC 9162 §2.1 Merkle tree and, after
each batch it seals, signs a *checkpoint*: a compact JWS (RFC 7515) with its JWKS key
(RFC 7517, ``kid`` in the header, ``typ: checkpoint+jwt``) over

``{"iss", "iat", "tree_size", "root_hash", "prev"}``

(``root_hash`` hex SHA-256 MTH of the first ``tree_size`` events; ``prev`` the checkpoint
before it: ``{"tree_size", "root_hash", "digest"}`` with ``digest`` the hex SHA-256 of its
compact JWS, or null for the first). An auditor holding only the JWKS and a checkpoint kept
elsewhere checks that an event is in the ledger (``verify_inclusion_bundle``) and that a later
checkpoint extends an earlier one (``verify_consistency_bundle``); nothing is fetched.

Command line, for auditors (``python -m countersign.ledger --help``)::

    python -m countersign.ledger checkpoint CHECKPOINT.json --jwks jwks.json
    python -m countersign.ledger inclusion PROOF.json --jwks jwks.json
    python -m countersign.ledger consistency PROOF.json --jwks jwks.json [--kept KEPT.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import rfc8785

from .errors import CountersignError
from .jsonbounds import jws_within
from .rfc9162 import leaf_hash, verify_consistency, verify_inclusion

__all__ = [
    "CHECKPOINT_TYP",
    "CONSISTENCY_SCHEMA",
    "EVENT_SCHEMA",
    "INCLUSION_SCHEMA",
    "LEAF_FIELDS",
    "Checkpoint",
    "LedgerError",
    "TrustedKeys",
    "checkpoint_digest",
    "event_leaf_data",
    "event_leaf_hash",
    "load_keys",
    "verify_checkpoint",
    "verify_consistency_bundle",
    "verify_inclusion_bundle",
]

CHECKPOINT_TYP = "checkpoint+jwt"
EVENT_SCHEMA = "countersign.audit.v1"
INCLUSION_SCHEMA = "countersign.audit.inclusion.v1"
CONSISTENCY_SCHEMA = "countersign.audit.consistency.v1"
ALGORITHMS: tuple[str, ...] = ("ES256", "RS256")
#: The members of an exported event that its leaf covers, in JCS (RFC 8785) form.
LEAF_FIELDS: tuple[str, ...] = (
    "seq",
    "id",
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
_HEX64 = frozenset("0123456789abcdef")


class LedgerError(CountersignError):
    """A checkpoint or proof that does not verify. The message says which check failed."""

    error = "invalid_proof"


@dataclass(frozen=True)
class Checkpoint:
    """A verified signed tree head."""

    tree_size: int
    root_hash: bytes
    issued_at: int
    issuer: str
    kid: str
    prev_tree_size: int | None
    prev_root_hash: bytes | None
    prev_digest: str | None
    jws: str


def event_leaf_data(event: Mapping[str, Any]) -> bytes:
    """The leaf data of an exported audit event: the RFC 8785 canonical JSON of its ``LEAF_FIELDS``.

    The server hashes exactly these bytes with ``leaf_hash`` (RFC 9162 §2.1.1) when it seals
    the event at position ``seq`` (leaf index ``seq - 1``).
    """
    missing = [name for name in LEAF_FIELDS if name not in event]
    if missing:
        raise LedgerError(f"the event lacks {', '.join(missing)}")
    return bytes(rfc8785.dumps({name: event[name] for name in LEAF_FIELDS}))


def event_leaf_hash(event: Mapping[str, Any]) -> bytes:
    """``HASH(0x00 || leaf data)`` of an exported event (RFC 9162 §2.1.1)."""
    return leaf_hash(event_leaf_data(event))


def checkpoint_digest(jws: str) -> str:
    """Hex SHA-256 of a checkpoint's compact JWS: what the next checkpoint's ``prev.digest`` holds."""
    return hashlib.sha256(jws.encode("ascii")).hexdigest()


def _hex32(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX64:
        raise LedgerError(f"{what} is not a lowercase hex SHA-256")
    return bytes.fromhex(value)


def _size(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LedgerError(f"{what} is not a non-negative integer")
    return value


@dataclass(frozen=True)
class TrustedKeys:
    """The signature keys of a JWKS, parsed once (``kid`` -> key, algorithm)."""

    by_kid: Mapping[str, tuple[Any, str]]


def load_keys(jwks: Mapping[str, Any] | TrustedKeys) -> TrustedKeys:
    """Parse a JWKS (RFC 7517 §5) once, for checking many checkpoints."""
    if isinstance(jwks, TrustedKeys):
        return jwks
    keys: dict[str, tuple[Any, str]] = {}
    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise LedgerError("the JWKS has no keys array (RFC 7517 §5)")
    for jwk in entries:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
            continue
        alg = jwk.get("alg") or {"EC": "ES256", "RSA": "RS256"}.get(str(jwk.get("kty")), "")
        if alg in ALGORITHMS:
            try:
                keys[jwk["kid"]] = (jwt.PyJWK(jwk, algorithm=alg).key, alg)
            except jwt.PyJWTError:
                continue
    return TrustedKeys(keys)


def verify_checkpoint(
    jws: str, jwks: Mapping[str, Any] | TrustedKeys, *, issuer: str | None = None
) -> Checkpoint:
    """Verify a checkpoint's signature and shape.

    RFC 7515 compact JWS; RFC 8725 hygiene: the algorithm from an allow-list (§3.1), the key
    found by ``kid`` in the given JWKS only (a dictionary key, never fetched, §3.10), an
    explicit ``typ`` (§3.11) so no token of another kind passes as a checkpoint, exact ``iss``
    when ``issuer`` is given (§3.8).
    """
    if not isinstance(jws, str) or len(jws) > 8192 or not jws_within(jws, 4):
        raise LedgerError("not a checkpoint")
    try:
        header = jwt.get_unverified_header(jws)
    except jwt.PyJWTError as exc:
        raise LedgerError(f"not a compact JWS: {exc}") from None
    if header.get("typ") != CHECKPOINT_TYP:
        raise LedgerError(f"typ is not {CHECKPOINT_TYP}")
    kid = header.get("kid")
    entry = load_keys(jwks).by_kid.get(kid) if isinstance(kid, str) else None
    if entry is None or not isinstance(kid, str):
        raise LedgerError("the checkpoint names no key in the JWKS (kid)")
    key, alg = entry
    if header.get("alg") != alg:
        raise LedgerError("the checkpoint's alg is not its key's")
    try:
        # A checkpoint does not expire; the leeway only forgives a verifier whose clock runs behind.
        claims: dict[str, Any] = jwt.decode(
            jws,
            key,
            algorithms=[alg],
            issuer=issuer,
            leeway=300,
            options={"require": ["iss", "iat"], "verify_aud": False},
        )
    except jwt.PyJWTError as exc:
        raise LedgerError(f"signature or claims do not verify: {exc}") from None
    size = _size(claims.get("tree_size"), "tree_size")
    root = _hex32(claims.get("root_hash"), "root_hash")
    prev = claims.get("prev")
    prev_size = prev_root = prev_digest = None
    if prev is not None:
        if not isinstance(prev, dict):
            raise LedgerError("prev is not an object")
        prev_size = _size(prev.get("tree_size"), "prev.tree_size")
        prev_root = _hex32(prev.get("root_hash"), "prev.root_hash")
        _hex32(prev.get("digest"), "prev.digest")
        prev_digest = str(prev["digest"])
        if prev_size > size:
            raise LedgerError("prev.tree_size is larger than tree_size")
    return Checkpoint(
        tree_size=size,
        root_hash=root,
        issued_at=int(claims["iat"]),
        issuer=str(claims["iss"]),
        kid=kid,
        prev_tree_size=prev_size,
        prev_root_hash=prev_root,
        prev_digest=prev_digest,
        jws=jws,
    )


def _path(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list) or len(value) > 64:
        raise LedgerError(f"{what} is not a list of at most 64 hashes")
    return [_hex32(item, what) for item in value]


def _checkpoint_jws(value: Any) -> str:
    jws = value.get("jws") if isinstance(value, dict) else value
    if not isinstance(jws, str):
        raise LedgerError("no checkpoint JWS")
    return jws


def verify_inclusion_bundle(
    bundle: Mapping[str, Any], jwks: Mapping[str, Any] | TrustedKeys, *, issuer: str | None = None
) -> Checkpoint:
    """Verify that ``bundle["event"]`` is leaf ``leaf_index`` of the tree the bundle's checkpoint signs.

    The leaf hash is recomputed from the event's content (``event_leaf_hash``), never taken from
    the bundle; the audit path is checked by RFC 9162 §2.1.3.2 against the checkpoint's root,
    whose signature is checked with ``verify_checkpoint``. Returns that checkpoint.
    """
    if bundle.get("schema") != INCLUSION_SCHEMA:
        raise LedgerError(f"schema is not {INCLUSION_SCHEMA}")
    checkpoint = verify_checkpoint(_checkpoint_jws(bundle.get("checkpoint")), jwks, issuer=issuer)
    event = bundle.get("event")
    if not isinstance(event, dict):
        raise LedgerError("no event")
    index = _size(bundle.get("leaf_index"), "leaf_index")
    if event.get("seq") != index + 1:
        raise LedgerError("the event's seq is not its leaf_index + 1")
    if _size(bundle.get("tree_size"), "tree_size") != checkpoint.tree_size:
        raise LedgerError("the proof's tree_size is not the checkpoint's")
    path = _path(bundle.get("inclusion_path"), "inclusion_path")
    if not verify_inclusion(index, checkpoint.tree_size, event_leaf_hash(event), path, checkpoint.root_hash):
        raise LedgerError(
            f"event {event.get('id')} is not leaf {index} of the tree of {checkpoint.tree_size}"
        )
    return checkpoint


def verify_consistency_bundle(
    bundle: Mapping[str, Any], jwks: Mapping[str, Any] | TrustedKeys, *, issuer: str | None = None
) -> tuple[Checkpoint, Checkpoint]:
    """Verify two checkpoints and that the second's tree extends the first's (RFC 9162 §2.1.4.2)."""
    if bundle.get("schema") != CONSISTENCY_SCHEMA:
        raise LedgerError(f"schema is not {CONSISTENCY_SCHEMA}")
    first = verify_checkpoint(_checkpoint_jws(bundle.get("first")), jwks, issuer=issuer)
    second = verify_checkpoint(_checkpoint_jws(bundle.get("second")), jwks, issuer=issuer)
    if first.issuer != second.issuer:
        raise LedgerError("the checkpoints come from different issuers")
    proof = _path(bundle.get("consistency_path"), "consistency_path")
    if not verify_consistency(first.tree_size, second.tree_size, first.root_hash, second.root_hash, proof):
        raise LedgerError(f"the tree of {second.tree_size} does not extend the tree of {first.tree_size}")
    return first, second


def _load(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        text = handle.read(1 << 22)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LedgerError(f"{path}: not JSON ({exc})") from None


def _load_kept(path: str) -> Any:
    """A kept checkpoint: one JSON document, or a JSON-lines file whose last line is the newest."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read(1 << 22)
    try:
        return json.loads(text)
    except ValueError:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            return json.loads(lines[-1]) if lines else None
        except ValueError as exc:
            raise LedgerError(f"{path}: not JSON ({exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m countersign.ledger``: the auditor's checks, from files only. Exit 0 when they pass."""
    parser = argparse.ArgumentParser(prog="python -m countersign.ledger", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["checkpoint", "inclusion", "consistency"])
    parser.add_argument("file", help="the checkpoint or proof (JSON, as the server's commands print it)")
    parser.add_argument("--jwks", required=True, help="the issuer's JWKS (its /.well-known/jwks.json), kept")
    parser.add_argument("--issuer", help="the issuer the checkpoint must name")
    parser.add_argument(
        "--kept",
        help="a checkpoint you kept (JSON, or JSON lines: the last): the consistency "
        "proof must start from it",
    )
    args = parser.parse_args(argv)
    jwks = load_keys(_load(args.jwks))
    document = _load(args.file)
    try:
        if args.what == "checkpoint":
            cp = verify_checkpoint(_checkpoint_jws(document), jwks, issuer=args.issuer)
            print(f"checkpoint verified: tree_size {cp.tree_size}, root {cp.root_hash.hex()}, kid {cp.kid}")
        elif args.what == "inclusion":
            cp = verify_inclusion_bundle(document, jwks, issuer=args.issuer)
            print(
                f"event {document['event'].get('id')} is leaf {document['leaf_index']} of the signed tree of "
                f"{cp.tree_size} (root {cp.root_hash.hex()})"
            )
        else:
            first, second = verify_consistency_bundle(document, jwks, issuer=args.issuer)
            if args.kept and first.jws != _checkpoint_jws(_load_kept(args.kept)):
                raise LedgerError("the proof does not start from the checkpoint you kept")
            print(
                f"the signed tree of {second.tree_size} extends the signed tree of {first.tree_size}"
                + (" (the one you kept)" if args.kept else "")
            )
    except LedgerError as exc:
        print(f"FAILED: {exc.description or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The signed ledger from the outside: checkpoints, proofs and what an auditor checks with the JWKS.

Every proof here is checked by ``countersign.ledger`` with the JWKS the server publishes, as an
auditor or resource server would, and compared with a recompute from the exported events.
"""

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from audit.models import AuditCheckpoint, AuditEvent, AuditLink
from audit.services import audit_record, audit_seal_all
from consent.models import SigningKey
from countersign.ledger import (
    LedgerError,
    event_leaf_hash,
    verify_checkpoint,
    verify_consistency_bundle,
    verify_inclusion_bundle,
)
from countersign.rfc9162 import merkle_root
from tests.audit.test_merkle import ref_path, ref_subproof
from tests.live import ROOT

pytestmark = pytest.mark.django_db


def _write(n: int, *, batch: int) -> list[AuditEvent]:
    rows = [
        audit_record(
            event="token.issued",
            actor=f"agent:a{i}",
            client_id=f"a{i}",
            user_id=i % 3 or None,
            detail={"jti": f"j{i}", "amount": f"{i}.00", "nested": {"k": [i, "x"]}},
        )
        for i in range(n)
    ]
    while audit_seal_all(limit=batch):
        pass
    return rows


def _prove(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command("audit_prove", *args, stdout=out)
    proof: dict[str, Any] = json.loads(out.getvalue())
    return proof


def _jwks(client: Client) -> dict[str, Any]:
    jwks: dict[str, Any] = client.get("/.well-known/jwks.json").json()
    return jwks


def _leaves() -> list[bytes]:
    """Leaf hashes recomputed from the exported events, not read from the ledger."""
    return [
        event_leaf_hash(_prove(str(link.event_id))["event"]) for link in AuditLink.objects.order_by("seq")
    ]


def test_each_batch_signs_one_checkpoint_over_the_events_so_far(client: Client) -> None:
    _write(23, batch=5)
    checkpoints = list(AuditCheckpoint.objects.order_by("tree_size"))
    assert [cp.tree_size for cp in checkpoints] == [5, 10, 15, 20, 23]
    leaves, jwks = _leaves(), _jwks(client)
    before = None
    for cp in checkpoints:
        signed = verify_checkpoint(cp.jws, jwks, issuer="http://127.0.0.1:8000")
        assert signed.tree_size == cp.tree_size and signed.root_hash == merkle_root(leaves[: cp.tree_size])
        assert signed.prev_tree_size == (before.tree_size if before else None)
        before = cp


def test_inclusion_proofs_for_every_event_against_every_checkpoint(client: Client) -> None:
    rows = _write(70, batch=9)  # heights above the stored stride are combined from stored nodes
    jwks, leaves = _jwks(client), _leaves()
    for cp in AuditCheckpoint.objects.order_by("tree_size"):
        for row in rows:
            seq = AuditLink.objects.get(event_id=row.pk).seq
            if seq > cp.tree_size:
                continue
            proof = _prove(str(row.pk), "--checkpoint", str(cp.tree_size))
            assert verify_inclusion_bundle(proof, jwks).tree_size == cp.tree_size
            assert proof["inclusion_path"] == [
                h.hex() for h in ref_path(seq - 1, leaves[: cp.tree_size], leaf=True)
            ]


def test_consistency_proofs_between_every_pair_of_checkpoints(client: Client) -> None:
    _write(70, batch=9)
    jwks, leaves = _jwks(client), _leaves()
    sizes = list(AuditCheckpoint.objects.order_by("tree_size").values_list("tree_size", flat=True))
    for i, first in enumerate(sizes):
        for second in sizes[i:]:
            proof = _prove("--consistency", str(first), str(second))
            old, new = verify_consistency_bundle(proof, jwks)
            assert (old.tree_size, new.tree_size) == (first, second)
            if first < second:
                assert proof["consistency_path"] == [
                    h.hex() for h in ref_subproof(first, leaves[:second], True, leaf=True)
                ]


def _hex_flips(value: str) -> Iterator[str]:
    for i in range(len(value)):
        yield value[:i] + ("0" if value[i] != "0" else "1") + value[i + 1 :]


def _jws_flips(jws: str) -> Iterator[str]:
    """Every character of every segment but the last, whose low bits may be base64 padding."""
    for i in range(len(jws)):
        if jws[i] == "." or i + 1 == len(jws) or jws[i + 1] == ".":
            continue
        yield jws[:i] + ("A" if jws[i] != "A" else "Q") + jws[i + 1 :]


def test_an_inclusion_proof_fails_when_any_byte_changes(client: Client) -> None:
    rows = _write(20, batch=6)
    jwks = _jwks(client)
    proof = _prove(str(rows[11].pk))
    verify_inclusion_bundle(proof, jwks)
    forgeries = []
    for j, element in enumerate(proof["inclusion_path"]):
        for forged in _hex_flips(element):
            forgeries.append(
                {
                    **proof,
                    "inclusion_path": proof["inclusion_path"][:j]
                    + [forged]
                    + proof["inclusion_path"][j + 1 :],
                }
            )
    for name, value in [
        ("detail", {**proof["event"]["detail"], "amount": "9999.00"}),
        ("actor", "agent:other"),
        ("outcome", "refused"),
        ("seq", proof["event"]["seq"] + 1),
        ("id", proof["event"]["id"] + 1),
        ("occurred_at", proof["event"]["occurred_at"].replace(":", "-", 1)),
        ("user_id", 99),
    ]:
        forgeries.append({**proof, "event": {**proof["event"], name: value}})
    forgeries.append({**proof, "leaf_index": proof["leaf_index"] + 1})
    forgeries.append({**proof, "tree_size": proof["tree_size"] + 1})
    for forged in _jws_flips(proof["checkpoint"]["jws"]):
        forgeries.append({**proof, "checkpoint": {**proof["checkpoint"], "jws": forged}})
    for forgery in forgeries:
        with pytest.raises(LedgerError):
            verify_inclusion_bundle(forgery, jwks)


def test_a_consistency_proof_fails_when_any_byte_changes(client: Client) -> None:
    _write(30, batch=7)
    jwks = _jwks(client)
    proof = _prove("--consistency", "7", "30")
    verify_consistency_bundle(proof, jwks)
    path = proof["consistency_path"]
    forgeries = [
        {**proof, "consistency_path": path[:j] + [f] + path[j + 1 :]}
        for j, element in enumerate(path)
        for f in _hex_flips(element)
    ]
    forgeries.append({**proof, "consistency_path": path[:-1]})
    forgeries.append({**proof, "first": proof["second"], "second": proof["first"]})
    for side in ("first", "second"):
        forgeries += [{**proof, side: {"jws": f}} for f in _jws_flips(proof[side]["jws"])]
    for forged in forgeries:
        with pytest.raises(LedgerError):
            verify_consistency_bundle(forged, jwks)


def test_a_checkpoint_signed_by_a_retired_key_verifies_while_that_key_is_published(client: Client) -> None:
    rows = _write(4, batch=10)
    old = AuditCheckpoint.objects.get()
    call_command("rotate_signing_key", stdout=StringIO())
    audit_record(event="token.issued", actor="agent:after-rotation")
    audit_seal_all()
    new = AuditCheckpoint.objects.order_by("-tree_size").first()
    assert new is not None
    assert new.kid != old.kid and SigningKey.objects.get(kid=old.kid).active is False
    jwks = _jwks(client)
    assert {k["kid"] for k in jwks["keys"]} >= {old.kid, new.kid}
    verify_checkpoint(old.jws, jwks)
    verify_inclusion_bundle(_prove(str(rows[0].pk), "--checkpoint", "4"), jwks)
    verify_consistency_bundle(_prove("--consistency", "4", str(new.tree_size)), jwks)
    # Once the retired key leaves the JWKS an outsider can no longer check what it signed with the
    # live JWKS (keep the JWKS with the checkpoints); the server still checks its own history.
    SigningKey.objects.filter(kid=old.kid).update(publish_until=timezone.now() - timedelta(seconds=1))
    with pytest.raises(LedgerError, match="kid"):
        verify_checkpoint(old.jws, _jwks(client))
    verify_checkpoint(old.jws, jwks)  # the JWKS kept from before still does
    out = StringIO()
    call_command("audit_verify", stdout=out, stderr=StringIO())
    assert f"intact: {new.tree_size} events" in out.getvalue()


def test_a_token_is_not_a_checkpoint(client: Client, session_token: str) -> None:
    with pytest.raises(LedgerError, match="typ"):
        verify_checkpoint(session_token, _jwks(client))


def test_the_auditors_command_line_checks_proofs_with_only_the_jwks(client: Client, tmp_path: Path) -> None:
    rows = _write(9, batch=4)
    (tmp_path / "jwks.json").write_text(json.dumps(_jwks(client)))
    (tmp_path / "proof.json").write_text(json.dumps(_prove(str(rows[5].pk))))
    (tmp_path / "consistency.json").write_text(json.dumps(_prove("--consistency", "4", "9")))
    out = StringIO()
    call_command("audit_checkpoint", stdout=out)
    (tmp_path / "checkpoint.json").write_text(out.getvalue())

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "countersign.ledger", *args, "--jwks", str(tmp_path / "jwks.json")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    for args in (
        ["checkpoint", str(tmp_path / "checkpoint.json")],
        ["inclusion", str(tmp_path / "proof.json")],
        ["consistency", str(tmp_path / "consistency.json")],
    ):
        result = run(*args)
        assert result.returncode == 0, result.stderr
    kept = tmp_path / "kept.jsonl"
    call_command(
        "audit_checkpoint", "--all", "--output", str(kept), stdout=StringIO()
    )  # 4, 8, 9: newest last
    assert run("consistency", str(tmp_path / "consistency.json"), "--kept", str(kept)).returncode == 1
    (tmp_path / "kept4.json").write_text(json.dumps(json.loads(kept.read_text().splitlines()[0])))
    result = run("consistency", str(tmp_path / "consistency.json"), "--kept", str(tmp_path / "kept4.json"))
    assert result.returncode == 0 and "the one you kept" in result.stdout, result.stderr
    forged = json.loads((tmp_path / "proof.json").read_text())
    forged["event"]["detail"]["amount"] = "1.00"
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    result = run("inclusion", str(tmp_path / "forged.json"))
    assert result.returncode == 1 and "FAILED" in result.stderr


def test_audit_checkpoint_exports_what_audit_verify_checks_against(tmp_path: Path) -> None:
    _write(6, batch=3)
    kept = tmp_path / "kept.jsonl"
    call_command("audit_checkpoint", "--all", "--output", str(kept), stdout=StringIO())
    assert [json.loads(line)["tree_size"] for line in kept.read_text().splitlines()] == [3, 6]
    printed = StringIO()
    call_command("audit_checkpoint", stdout=printed)  # the newest, pretty-printed
    (tmp_path / "newest.json").write_text(printed.getvalue())
    out = StringIO()
    call_command(
        "audit_verify",
        "--checkpoint",
        str(kept),
        "--checkpoint",
        str(tmp_path / "newest.json"),
        stdout=out,
        stderr=StringIO(),
    )
    assert "matches 2 checkpoint(s) kept elsewhere" in out.getvalue()


def test_proofs_for_what_cannot_be_proven_are_refused_clearly(db: None) -> None:
    from django.core.management import CommandError

    rows = _write(3, batch=3)
    unsealed = audit_record(event="token.issued", actor="agent:late")  # sealed inline on SQLite only
    for args, message in [
        ([str(rows[0].pk), "--checkpoint", "2"], "no checkpoint of tree size 2"),
        (["999999"], "no audit event 999999"),
        (["--consistency", "3", "1"], "no checkpoint of tree size 1"),
        ([], "give an event id"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("audit_prove", *args, stdout=StringIO())
    from django.db import connection

    if connection.vendor == "postgresql":
        with pytest.raises(CommandError, match="not sealed yet"):
            call_command("audit_prove", str(unsealed.pk), "--checkpoint", "3", stdout=StringIO())


def test_a_sealer_batch_costs_the_same_few_statements_however_large(db: None) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from audit.services import audit_seal

    audit_record(event="token.issued", actor="agent:warm-up")  # the first batch creates the key and the head
    audit_seal()
    counts = []
    for n in (3, 300):
        for i in range(n):
            audit_record(event="token.issued", actor=f"agent:{n}-{i}")
        with CaptureQueriesContext(connection) as queries:
            assert audit_seal(limit=1000).linked == n
        counts.append(len(queries.captured_queries))
    # The same statements for 3 events as for 300; the larger batch also completes tree nodes (one INSERT).
    assert counts[1] - counts[0] <= 1 and max(counts) <= 10, counts
    assert AuditCheckpoint.objects.count() == 3  # one signature per batch

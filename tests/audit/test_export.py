"""Exports for SIEMs (audit_export, /audit/events/), the public checkpoints, the proof endpoints and
the witnesses that keep checkpoints off the machine. Refusals are JSON errors, change nothing and
leave an audit row."""

import csv
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client, override_settings
from pytest_django import DjangoCaptureOnCommitCallbacks

from audit.models import AuditCheckpoint, AuditEvent, AuditLink
from audit.readers import audit_reader_create, audit_reader_revoke
from audit.services import audit_record, audit_seal_all
from audit.tasks import checkpoint_push
from consent.models import ScopePolicy
from countersign.ledger import event_leaf_hash, verify_consistency_bundle, verify_inclusion_bundle
from tests.conftest import ClientResponse, Scenario

pytestmark = pytest.mark.django_db


@pytest.fixture
def events(db: None) -> list[AuditEvent]:
    rows: list[AuditEvent] = []
    for i in range(12):
        rows.append(
            audit_record(
                event="token.issued" if i % 4 else "login",
                actor=f"agent:c{i % 3}" if i % 4 else f"user:{i}",
                user_id=i if i % 4 == 0 else None,
                client_id=f"c{i % 3}",
                detail={"jti": f"j{i}", "note": "é ünïcode"},
                error="" if i % 5 else "nope",
                outcome="ok" if i % 5 else "refused",
            )
        )
    while audit_seal_all(limit=5):
        pass
    return rows


def _export(*args: str) -> str:
    out = StringIO()
    call_command("audit_export", *args, stdout=out)
    return out.getvalue()


def _refusals(event: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event=event, outcome="refused"))


def test_jsonl_export_carries_each_events_position_and_its_leaf_recomputes(events: list[AuditEvent]) -> None:
    lines = [json.loads(line) for line in _export().splitlines()]
    assert [doc["seq"] for doc in lines] == list(range(1, 13))
    assert all(
        doc["schema"] == "countersign.audit.v1" and doc["leaf_index"] == doc["seq"] - 1 for doc in lines
    )
    links = {link.seq: link.leaf for link in AuditLink.objects.all()}
    for doc in lines:
        assert event_leaf_hash(doc).hex() == doc["leaf_hash"] == links[doc["seq"]]


def test_csv_export_is_provable_too(events: list[AuditEvent]) -> None:
    rows = list(csv.DictReader(io.StringIO(_export("--format", "csv"))))
    assert len(rows) == 12
    for row in rows:
        doc = {
            **row,
            "seq": int(row["seq"]),
            "id": int(row["id"]),
            "detail": json.loads(row["detail"]),
            "user_id": int(row["user_id"]) if row["user_id"] else None,
        }
        assert event_leaf_hash(doc).hex() == row["leaf_hash"]


def test_ocsf_export_maps_sign_ins_and_api_activity(events: list[AuditEvent]) -> None:
    records = [json.loads(line) for line in _export("--format", "ocsf").splitlines()]
    assert {r["class_uid"] for r in records} == {3002, 6003}
    login = next(r for r in records if r["message"] == "login")
    assert login["class_name"] == "Authentication" and login["type_uid"] == 300201
    issued = next(r for r in records if r["message"] == "token.issued" and r["status_id"] == 1)
    assert issued["activity_name"] == "Create" and issued["api"]["operation"] == "token.issued"
    refused = next(r for r in records if r["status_id"] == 2)
    assert refused["status_code"] == "nope" and refused["severity_id"] == 3
    for record in records:
        assert (
            event_leaf_hash(record["unmapped"]["countersign"]).hex()
            == record["unmapped"]["countersign"]["leaf_hash"]
        )


def test_export_filters_by_principal_and_time(events: list[AuditEvent]) -> None:
    by_agent = [json.loads(line) for line in _export("--principal", "agent:c1").splitlines()]
    assert by_agent and all(d["client_id"] == "c1" or d["actor"] == "agent:c1" for d in by_agent)
    by_user = [json.loads(line) for line in _export("--principal", "user:4").splitlines()]
    assert [d["user_id"] for d in by_user] == [4]
    cut = json.loads(_export().splitlines()[6])["occurred_at"]
    later = [json.loads(line) for line in _export("--since", cut).splitlines()]
    assert later and all(d["occurred_at"] >= cut for d in later)
    assert _export("--until", "2000-01-01") == ""
    for args in (["--principal", "nobody"], ["--since", "yesterday"], ["--principal", "user:x"]):
        with pytest.raises(CommandError):
            _export(*args)


# --- public checkpoints ---------------------------------------------------------------------------


def test_checkpoints_are_public_listed_and_the_latest_is_served(
    client: Client, events: list[AuditEvent]
) -> None:
    latest = client.get("/audit/checkpoints/latest")
    assert latest.status_code == 200 and latest.json()["tree_size"] == 12
    page = client.get("/audit/checkpoints/?limit=2").json()
    assert [c["tree_size"] for c in page["checkpoints"]] == [5, 10] and page["next"] == 10
    rest = client.get("/audit/checkpoints/?after=10").json()
    assert [c["tree_size"] for c in rest["checkpoints"]] == [12] and rest["next"] is None
    assert client.get("/audit/checkpoints/5").json()["jws"] == AuditCheckpoint.objects.get(tree_size=5).jws
    metadata = client.get("/.well-known/oauth-authorization-server").json()
    assert metadata["audit_checkpoints_endpoint"] == "http://127.0.0.1:8000/audit/checkpoints/"


@pytest.mark.parametrize(
    "path, status, error",
    [
        ("/audit/checkpoints/?after=-1", 400, "invalid_request"),
        ("/audit/checkpoints/?limit=0", 400, "invalid_request"),
        ("/audit/checkpoints/?limit=5000", 400, "invalid_request"),
        ("/audit/checkpoints/?after=1&after=2", 400, "invalid_request"),
        ("/audit/checkpoints/?cursor=3", 400, "invalid_request"),
        ("/audit/checkpoints/abc", 400, "invalid_request"),
        ("/audit/checkpoints/7", 404, "not_found"),
    ],
)
def test_bad_checkpoint_requests_are_refused_and_audited(
    client: Client, events: list[AuditEvent], path: str, status: int, error: str
) -> None:
    before = AuditCheckpoint.objects.count()
    response = client.get(path)
    assert response.status_code == status and response.json()["error"] == error
    assert len(_refusals("audit.checkpoints_refused")) == 1
    assert AuditCheckpoint.objects.count() == before


def test_writing_to_the_checkpoints_endpoint_is_refused(client: Client, events: list[AuditEvent]) -> None:
    response = client.post("/audit/checkpoints/", data={"tree_size": 1})
    assert response.status_code == 405 and response["Allow"] == "GET, HEAD"
    assert len(_refusals("audit.checkpoints_refused")) == 1


def test_a_flood_of_bad_requests_leaves_one_row_per_minute(client: Client, events: list[AuditEvent]) -> None:
    for _ in range(5):
        assert client.get("/audit/checkpoints/?limit=x").status_code == 400
    assert len(_refusals("audit.checkpoints_refused")) == 1


# --- the pull endpoint -----------------------------------------------------------------------------


@pytest.fixture
def reader(db: None) -> str:
    return audit_reader_create(name="siem", actor="cli")[1]


def _pull(client: Client, token: str, **params: str | int) -> ClientResponse:
    return client.get("/audit/events/", params, HTTP_AUTHORIZATION=f"Bearer {token}")


def test_a_log_shipper_pulls_every_sealed_event_once_by_cursor(
    client: Client, events: list[AuditEvent], reader: str
) -> None:
    seen, cursor = [], "0"
    while True:
        body = _pull(client, reader, cursor=cursor, limit=5).json()
        seen += [e["seq"] for e in body["events"]]
        cursor = body["next_cursor"]
        if not body["more"]:
            break
    assert seen == list(range(1, 13)) and body["tree_size"] == 12
    assert _pull(client, reader, cursor=cursor).json()["events"] == []
    ocsf = _pull(client, reader, format="ocsf", limit=1).json()
    assert ocsf["events"][0]["unmapped"]["countersign"]["seq"] == 1


@pytest.mark.parametrize("header", ["", "Bearer csa_wrong", "Basic c2llbTp4", "Bearer "])
def test_the_pull_endpoint_refuses_without_a_reader_token(
    client: Client, events: list[AuditEvent], header: str
) -> None:
    kwargs: dict[str, Any] = {"HTTP_AUTHORIZATION": header} if header else {}
    response = client.get("/audit/events/", **kwargs)
    assert response.status_code == 401 and response.json()["error"] == "invalid_token"
    assert response["WWW-Authenticate"].startswith('Bearer realm="countersign", error="invalid_token"')
    assert len(_refusals("audit.export_refused")) == 1


def test_a_revoked_reader_is_refused(client: Client, events: list[AuditEvent], reader: str) -> None:
    assert _pull(client, reader).status_code == 200
    audit_reader_revoke(name="siem", actor="cli")
    assert _pull(client, reader).status_code == 401


def test_guessing_tokens_locks_the_source_out(client: Client, events: list[AuditEvent], reader: str) -> None:
    for _ in range(10):
        assert _pull(client, "csa_guess").status_code == 401
    response = _pull(client, reader)
    assert response.status_code == 429 and response.json()["error"] == "too_many_requests"
    assert AuditEvent.objects.filter(event="attempts.locked").count() == 1


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "-1"},
        {"cursor": "abc"},
        {"limit": "0"},
        {"limit": "100000"},
        {"format": "xml"},
        {"since": "soon"},
        {"principal": "nobody"},
        {"secret": "1"},
    ],
)
def test_bad_pull_requests_are_refused_and_audited_with_the_reader(
    client: Client, events: list[AuditEvent], reader: str, params: dict[str, str]
) -> None:
    response = _pull(client, reader, **params)
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert [r.actor for r in _refusals("audit.export_refused")] == ["audit_reader:siem"]


def test_proofs_over_http_verify_with_the_jwks(client: Client, events: list[AuditEvent], reader: str) -> None:
    jwks = client.get("/.well-known/jwks.json").json()
    auth: dict[str, Any] = {"HTTP_AUTHORIZATION": f"Bearer {reader}"}
    proof = client.get("/audit/proofs/inclusion", {"event_id": events[3].pk, "tree_size": 5}, **auth).json()
    assert verify_inclusion_bundle(proof, jwks).tree_size == 5
    consistency = client.get("/audit/proofs/consistency", {"first": 5}, **auth).json()
    assert [c.tree_size for c in verify_consistency_bundle(consistency, jwks)] == [5, 12]
    missing = client.get("/audit/proofs/inclusion", {"event_id": 10**9}, **auth)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert client.get("/audit/proofs/inclusion", **auth).status_code == 400
    assert client.get("/audit/proofs/inclusion", {"event_id": events[0].pk}).status_code == 401
    assert len(_refusals("audit.proof_refused")) == 3


# --- witnesses -------------------------------------------------------------------------------------


def test_each_checkpoint_is_appended_to_the_file_sink_and_audit_verify_checks_it(
    db: None, tmp_path: Path, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    sink = tmp_path / "witness.jsonl"
    with override_settings(COUNTERSIGN={"AUDIT_CHECKPOINT_FILE": str(sink)}):
        with django_capture_on_commit_callbacks(execute=True):
            for i in range(4):
                audit_record(event="token.issued", actor=f"agent:{i}")
            audit_seal_all(limit=2)
            audit_seal_all(limit=2)
        assert [json.loads(line)["tree_size"] for line in sink.read_text().splitlines()] == [2, 4]
        out = StringIO()
        call_command("audit_verify", "--no-seal", stdout=out, stderr=StringIO())
        assert "matches 1 checkpoint(s) kept elsewhere" in out.getvalue()
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET session_replication_role = replica")
                cursor.execute(
                    "TRUNCATE audit_auditevent, audit_auditlink, audit_auditnode, audit_auditcheckpoint,"
                    " audit_audithead"
                )
                cursor.execute("SET session_replication_role = origin")
            err = StringIO()
            with pytest.raises(CommandError):
                call_command("audit_verify", "--no-seal", stdout=StringIO(), stderr=err)
            assert (
                "position 1: the checkpoint kept elsewhere signs 4 events and the ledger holds 0"
                in err.getvalue()
            )


class _Witness(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Witness.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_webhook_witness_receives_each_checkpoint(events: list[AuditEvent]) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Witness)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Witness.received = []
    try:
        with override_settings(
            COUNTERSIGN={"AUDIT_CHECKPOINT_WEBHOOK": f"http://127.0.0.1:{server.server_port}/cp"}
        ):
            checkpoint_push.apply(args=(12,)).get()
    finally:
        server.shutdown()
    assert [(d["tree_size"], d["jws"]) for d in _Witness.received] == [
        (12, AuditCheckpoint.objects.get(tree_size=12).jws)
    ]


# --- a resource server proves the approval it acted on ----------------------------------------------


def test_a_resource_server_gets_the_proof_of_the_approval_it_acts_on(
    client: Client, scenario: Scenario, ledger_policy: ScopePolicy
) -> None:
    from approvals.services import approval_approve
    from tests.approvals.support import auth_now, request_approval, session_grant
    from tests.conftest import basic

    approval, _ = request_approval(session_grant(scenario))
    approval_approve(approval_id=approval.pk, user=scenario.user, auth=auth_now())
    audit_seal_all()
    ledger: dict[str, Any] = {"HTTP_AUTHORIZATION": basic(scenario.ledger_client_id, scenario.ledger_secret)}
    response = client.get("/audit/proofs/approval", {"approval_id": str(approval.pk)}, **ledger)
    assert response.status_code == 200, response.content
    proof = response.json()
    verify_inclusion_bundle(proof, client.get("/.well-known/jwks.json").json())
    assert proof["event"]["event"] == "approval.approved"
    assert proof["event"]["detail"]["approval_id"] == str(approval.pk)
    # Another downstream system's credentials: as if the approval did not exist.
    other: dict[str, Any] = {"HTTP_AUTHORIZATION": basic(scenario.rs_client_id, scenario.rs_secret)}
    response = client.get("/audit/proofs/approval", {"approval_id": str(approval.pk)}, **other)
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    response = client.get(
        "/audit/proofs/approval",
        {"approval_id": str(approval.pk)},
        HTTP_AUTHORIZATION=basic(scenario.ledger_client_id, "wrong"),
    )
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert client.get("/audit/proofs/approval", {"approval_id": "x"}, **ledger).status_code == 400
    assert len(_refusals("audit.proof_refused")) == 3

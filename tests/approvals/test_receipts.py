"""Signed receipts: returned by the redemption, downloadable by the owner, verified offline."""

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from django.contrib.auth.models import User
from django.test import Client

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.keys import jwks as published_jwks
from countersign import InvalidReceipt, verify_receipt
from tests.approvals.conftest import LEDGER_ENTRY, Agent
from tests.conftest import PASSWORD, Scenario

pytestmark = pytest.mark.django_db

ISSUER = "http://127.0.0.1:8000"


@pytest.fixture
def redeemed(agent: Agent, client: Client) -> dict[str, Any]:
    response = agent.redeem(agent.approved_token(client))
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def _jwks() -> dict[str, Any]:
    return published_jwks()


def test_the_redemption_returns_a_receipt_that_verifies_offline(
    redeemed: dict[str, Any], scenario: Scenario
) -> None:
    claims = verify_receipt(redeemed["receipt"], jwks=_jwks(), issuer=ISSUER)
    approval = ApprovalRequest.objects.select_related("action_token").get()
    assert claims["sub"] == f"user:{scenario.user.pk}"
    assert claims["act"] == {"sub": f"agent:{scenario.agent.client_id}"}
    assert claims["approver"]["sub"] == f"user:{scenario.user.pk}" and claims["approver"]["amr"] == ["pwd"]
    assert claims["authorization_details"] == [LEDGER_ENTRY] and claims["action_hash"] == approval.action_hash
    assert approval.decided_at is not None and approval.action_token.redeemed_at is not None
    assert claims["approved_at"] == int(approval.decided_at.timestamp())
    assert claims["redeemed_at"] == int(approval.action_token.redeemed_at.timestamp())
    assert claims["resource_server"] == {
        "audience": "http://ledger.test",
        "client_id": scenario.ledger_client_id,
        "name": "Ledger",
    }
    assert jwt.get_unverified_header(redeemed["receipt"])["typ"] == "receipt+jwt"


def test_the_owner_downloads_the_same_receipt(
    redeemed: dict[str, Any], client: Client, scenario: Scenario
) -> None:
    approval = ApprovalRequest.objects.get()
    response = client.get(f"/approvals/{approval.pk}/receipt/")
    assert response.status_code == 200 and "attachment" in response["Content-Disposition"]
    downloaded = verify_receipt(response.content.decode(), jwks=_jwks(), issuer=ISSUER)
    assert downloaded == verify_receipt(redeemed["receipt"], jwks=_jwks(), issuer=ISSUER)
    assert "/receipt/" in client.get("/approvals/").content.decode()
    client.logout()
    assert client.get(f"/approvals/{approval.pk}/receipt/").status_code == 302  # sign in first


def test_no_receipt_for_another_user_or_an_unredeemed_request(
    agent: Agent, client: Client, django_user_model: type[User]
) -> None:
    agent.ask()
    approval = ApprovalRequest.objects.get()
    client.login(username="officer", password=PASSWORD)
    assert client.get(f"/approvals/{approval.pk}/receipt/").status_code == 404  # still pending
    django_user_model.objects.create_user("mallory", password=PASSWORD)
    client.login(username="mallory", password=PASSWORD)
    assert client.get(f"/approvals/{approval.pk}/receipt/").status_code == 404
    assert AuditEvent.objects.filter(event="receipt.refused").count() == 2


def _tamper(receipt: str, **changes: Any) -> str:
    head, body, sig = receipt.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def test_a_tampered_receipt_is_refused(redeemed: dict[str, Any]) -> None:
    entry = {**LEDGER_ENTRY, "amount": "42500.00"}
    for forged in (
        _tamper(redeemed["receipt"], authorization_details=[entry]),
        _tamper(redeemed["receipt"], sub="user:999"),
        redeemed["receipt"][:-6] + "AAAAAA",
    ):
        with pytest.raises(InvalidReceipt):
            verify_receipt(forged, jwks=_jwks(), issuer=ISSUER)


def test_a_receipt_by_another_key_or_issuer_is_refused(redeemed: dict[str, Any]) -> None:
    claims = jwt.decode(redeemed["receipt"], options={"verify_signature": False})
    kid = jwt.get_unverified_header(redeemed["receipt"])["kid"]
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": kid, "typ": "receipt+jwt"})
    with pytest.raises(InvalidReceipt, match="does not verify"):
        verify_receipt(forged, jwks=_jwks(), issuer=ISSUER)
    with pytest.raises(InvalidReceipt, match="not in this JWKS"):
        verify_receipt(redeemed["receipt"], jwks={"keys": []}, issuer=ISSUER)
    with pytest.raises(InvalidReceipt):
        verify_receipt(redeemed["receipt"], jwks=_jwks(), issuer=ISSUER + ".evil")
    not_a_receipt = jwt.encode(claims, other, algorithm="ES256", headers={"kid": kid, "typ": "action+jwt"})
    with pytest.raises(InvalidReceipt, match="not a receipt"):
        verify_receipt(not_a_receipt, jwks=_jwks(), issuer=ISSUER)


def test_the_command_line_verifies_a_downloaded_receipt(redeemed: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "r.jwt").write_text(redeemed["receipt"])
    (tmp_path / "jwks.json").write_text(json.dumps(_jwks()))
    (tmp_path / "bad.jwt").write_text(_tamper(redeemed["receipt"], scope="anything"))
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "countersign",
            "verify-receipt",
            str(tmp_path / "r.jwt"),
            "--jwks",
            str(tmp_path / "jwks.json"),
            "--issuer",
            ISSUER,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["approval_id"] == redeemed["approval_id"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "countersign",
            "verify-receipt",
            str(tmp_path / "bad.jwt"),
            "--jwks",
            str(tmp_path / "jwks.json"),
            "--issuer",
            ISSUER,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and "NOT VALID" in bad.stderr

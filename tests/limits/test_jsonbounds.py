"""JSON is measured before it is parsed: deep nesting is a clear refusal, never a RecursionError."""

import base64
import json

import httpx
import pytest

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.limits.jsonbounds import JSONTooDeep, JSONTooLarge, check, check_jwt
from countersign.jsonbounds import depth_within
from tests.approvals.support import ledger_entry
from tests.conftest import Scenario, basic
from tests.live import LiveStack

DEEP = "[" * 900 + "]" * 900  # 1.8 KB, past the parser's recursion limit


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_depth_is_measured_without_recursion() -> None:
    assert depth_within(b'{"a": [1, {"b": 2}]}', 3)
    assert not depth_within(b'{"a": [1, {"b": [2]}]}', 3)
    # Brackets inside strings (escaped quotes too) are not nesting.
    assert depth_within(json.dumps({"s": '[[[[[[\\"{{{{{{'}).encode(), 1)
    assert not depth_within(("[" * 100_000).encode(), 16)  # a linear scan, whatever the depth
    with pytest.raises(JSONTooDeep):
        check(DEEP, max_bytes=8192)
    with pytest.raises(JSONTooLarge):
        check("[1]" * 5000, max_bytes=8192)
    with pytest.raises(JSONTooDeep):
        check_jwt(f"{_b64(DEEP.encode())}.{_b64(b'{}')}.sig")
    check_jwt(_b64(b'{"alg": "ES256"}') + "." + _b64(b'{"iss": "a"}') + ".sig")


def _ask(live: LiveStack, scenario: Scenario, **data: str) -> httpx.Response:
    return httpx.post(
        f"{live.url}/o/bc-authorize/",
        data={"scope": "ledger:write", **data},
        headers={"Authorization": basic(scenario.agent.client_id, scenario.agent_secret)},
        timeout=10,
    )


def test_deeply_nested_authorization_details_are_refused_not_a_500(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    nested = json.dumps([{**ledger_entry(), "memo": json.loads("[" * 17 + "]" * 17)}])
    for details in (DEEP, nested):
        response = _ask(live, scenario, login_hint_token=session_token, authorization_details=details)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_authorization_details"
        assert "deeper than 16" in response.json()["error_description"]
    assert ApprovalRequest.objects.count() == 0
    refused = AuditEvent.objects.filter(
        event="approval.request_refused", error="invalid_authorization_details"
    )
    assert refused.count() == 2


def test_jwts_with_deep_json_are_refused_at_every_endpoint(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    mark = live.mark()
    header = b'{"alg": "ES256", "typ": "at+jwt", "x": ' + DEEP.encode() + b"}"
    deep_jwt = _b64(header) + "." + _b64(DEEP.encode()) + ".c2ln"
    # A login_hint_token that is not a valid session token.
    hint = _ask(live, scenario, login_hint_token=deep_jwt, authorization_details=json.dumps([ledger_entry()]))
    assert hint.status_code == 400 and hint.json()["error"] == "invalid_request"
    # A private_key_jwt client assertion.
    assertion = httpx.post(
        f"{live.url}/o/token/",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "x",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": deep_jwt,
        },
        timeout=10,
    )
    assert assertion.status_code == 401 and assertion.json()["error"] == "invalid_client"
    # A DPoP proof.
    dpop = httpx.post(
        f"{live.url}/o/token/",
        data={"grant_type": "refresh_token", "refresh_token": "x"},
        headers={"Authorization": basic(scenario.agent.client_id, scenario.agent_secret), "DPoP": deep_jwt},
        timeout=10,
    )
    assert dpop.status_code == 400 and dpop.json()["error"] == "invalid_dpop_proof"
    # An action token at redemption, and a token at introspection.
    redeem = httpx.post(
        f"{live.url}/o/redeem/",
        data={"token": deep_jwt},
        headers={"Authorization": basic(scenario.ledger_client_id, scenario.ledger_secret)},
        timeout=10,
    )
    assert redeem.status_code == 400 and redeem.json() == {
        "error": "invalid_token",
        "error_description": "malformed token",
        "reason": "invalid_token",
    }
    introspect = httpx.post(
        f"{live.url}/o/introspect/",
        data={"token": deep_jwt},
        headers={"Authorization": basic(scenario.rs_client_id, scenario.rs_secret)},
        timeout=10,
    )
    assert introspect.status_code == 200 and introspect.json() == {"active": False}
    for event in (
        "approval.request_refused",
        "token.refused",
        "redemption.refused",
        "introspection.inactive",
    ):
        assert AuditEvent.objects.filter(event=event).count() >= 1, event
    logged = live.logs_since(mark)
    assert "Traceback" not in logged and "RecursionError" not in logged, logged[-4000:]

"""Delivery through the real stack: granian (HTTP), uvicorn + Channels over Redis (websockets), a real Celery worker.

The agent talks HTTP to the live server; the user's inbox is a real websocket client.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from approvals.models import ApprovalRequest
from approvals.tasks import deliver_prompt
from audit.models import AuditEvent
from consent.models import ScopePolicy
from consent.services import grant_revoke
from tests.approvals.conftest import LEDGER_ENTRY
from tests.conftest import Scenario, basic
from tests.live import LiveStack

pytestmark = [pytest.mark.django_db(transaction=True)]


class Inbox:
    """A browser tab's websocket, signed in as ``user``."""

    def __init__(self, stack: LiveStack, user: User, origin: str | None = None) -> None:  # noqa: D107
        client = Client()
        client.force_login(user)
        cookie = f"sessionid={client.cookies['sessionid'].value}"
        self.ws = connect(
            stack.url.replace("http", "ws") + "/ws/approvals/",
            additional_headers={"Cookie": cookie, "Origin": origin or stack.url},
            open_timeout=5,
        )

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.ws.recv(timeout=timeout))
        return message

    def next_of(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.1, deadline - time.monotonic()))
            if msg["type"] == kind:
                return msg

    def close(self) -> None:
        self.ws.close()


def _ask(stack: LiveStack, scenario: Scenario, session_token: str, **extra: str) -> httpx.Response:
    data = {
        "scope": "ledger:write",
        "login_hint_token": session_token,
        "authorization_details": json.dumps([LEDGER_ENTRY]),
        **extra,
    }
    return httpx.post(
        f"{stack.url}/o/bc-authorize/",
        data=data,
        headers={"Authorization": basic(scenario.agent.client_id, scenario.agent_secret)},
        timeout=10,
    )


def test_prompt_reaches_open_inbox_and_replays_on_reconnect(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    inbox = Inbox(live, scenario.user)
    try:
        assert inbox.next()["prompts"] == []  # snapshot on connect
        response = _ask(live, scenario, session_token, binding_message="<b>step 5</b>")
        assert response.status_code == 200, response.text
        prompt = inbox.next_of("upsert")["prompt"]
        assert prompt["headline"].startswith("Append 4250.00 USD to Acme Office Supply")
        assert prompt["binding_message"] == "<b>step 5</b>" and prompt["agent"] == "Procurement Agent"
        approval = ApprovalRequest.objects.get()
        assert str(approval.pk) == prompt["id"]

        # A redelivered task sends the same prompt again, under the same id: the inbox upserts it.
        deliver_prompt.delay(str(approval.pk))
        again = inbox.next_of("upsert")["prompt"]
        assert again["id"] == prompt["id"]
        assert AuditEvent.objects.filter(event="approval.delivered").count() == 1
    finally:
        inbox.close()
    reconnected = Inbox(live, scenario.user)
    try:
        assert [p["id"] for p in reconnected.next()["prompts"]] == [prompt["id"]]
    finally:
        reconnected.close()


def test_identical_requests_collapse_into_one_prompt(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    first = _ask(live, scenario, session_token).json()
    second = _ask(live, scenario, session_token).json()
    assert first["auth_req_id"] == second["auth_req_id"]
    assert ApprovalRequest.objects.count() == 1


def test_expiry_without_polling_removes_the_prompt(
    live: LiveStack, scenario: Scenario, session_token: str, ledger_policy: ScopePolicy
) -> None:
    # An agent cannot ask for less than REQUESTED_EXPIRY_MIN; an admin's own window can be shorter.
    ledger_policy.approval_window = 2
    ledger_policy.save()
    inbox = Inbox(live, scenario.user)
    try:
        inbox.next()
        assert _ask(live, scenario, session_token).status_code == 200
        inbox.next_of("upsert")
        time.sleep(2.2)  # the window ends; the beat's next sweep finds it
        live.sweep()
        removed = inbox.next_of("remove", timeout=15)
        assert removed["status"] == "expired"
        assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.EXPIRED
    finally:
        inbox.close()


def test_revoking_the_grant_cancels_pending_prompts_in_open_inboxes(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    inbox = Inbox(live, scenario.user)
    try:
        inbox.next()
        _ask(live, scenario, session_token)
        prompt = inbox.next_of("upsert")["prompt"]
        approval = ApprovalRequest.objects.get()
        grant_revoke(grant_id=approval.grant_id, reason="revoked_by_user", actor="user:test")
        removed = inbox.next_of("remove")
        assert removed == {
            "type": "remove",
            "seq": removed["seq"],
            "id": prompt["id"],
            "status": "cancelled",
            "label": "Cancelled",
        }
        assert isinstance(removed["seq"], int)
    finally:
        inbox.close()


def test_user_never_receives_another_users_prompts(
    live: LiveStack, scenario: Scenario, session_token: str, django_user_model: type[User]
) -> None:
    other = django_user_model.objects.create_user("someone-else", password="x" * 12)
    theirs = Inbox(live, other)
    mine = Inbox(live, scenario.user)
    try:
        theirs.next(), mine.next()
        _ask(live, scenario, session_token)
        mine.next_of("upsert")
        with pytest.raises(TimeoutError):
            theirs.next(timeout=1.5)
    finally:
        theirs.close()
        mine.close()


def test_websocket_refuses_anonymous_and_foreign_origin(live: LiveStack, scenario: Scenario) -> None:
    with pytest.raises(InvalidStatus):
        connect(
            live.url.replace("http", "ws") + "/ws/approvals/",
            additional_headers={"Origin": live.url},
            open_timeout=5,
        )
    with pytest.raises(InvalidStatus):
        Inbox(live, scenario.user, origin="http://evil.example")


class _Recorder(BaseHTTPRequestHandler):
    calls: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append({"auth": self.headers.get("Authorization"), "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_ping_mode_notifies_the_agent_after_the_decision(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        scenario.agent.backchannel_client_notification_endpoint = f"http://127.0.0.1:{server.server_port}/cb"
        scenario.agent.save()
        missing = _ask(live, scenario, session_token)
        assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
        body = _ask(live, scenario, session_token, client_notification_token="notify-me-123").json()
        officer = Client()
        officer.force_login(scenario.user)
        approval = ApprovalRequest.objects.get()
        assert officer.post(f"/approvals/{approval.pk}/approve/").status_code == 302
        deadline = time.monotonic() + 10
        while not _Recorder.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _Recorder.calls == [
            {"auth": "Bearer notify-me-123", "body": {"auth_req_id": body["auth_req_id"]}}
        ]
        token = httpx.post(
            f"{live.url}/o/token/",
            content=urlencode(
                {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": body["auth_req_id"]}
            ),
            headers={
                "Authorization": basic(scenario.agent.client_id, scenario.agent_secret),
                "Content-Type": "application/x-www-form-urlencoded",
            },
            timeout=10,
        )
        assert token.status_code == 200 and token.json()["scope"] == "ledger:write"
        approval.refresh_from_db()
        assert approval.notified_at is not None and approval.notify_attempts == 1
    finally:
        server.shutdown()

"""Every way a session grant can end early, checked against the same list of consequences.

DESIGN.md, flow 4: "Revoking a grant makes its tokens inactive at once (introspection,
redemption), cancels pending approvals, and tells open browser tabs." The same must hold
whoever ends the grant: the user (/grants/), an admin (grant action, agent suspension by
form or action), the command line (``agent_update --status suspended``), the agent itself
(RFC 7009 with either token), or the server on refresh-token reuse (RFC 9700 §4.14.2).

Each case starts from the same armed state: a session access token, its refresh token (after
one rotation, so a rotated-out refresh token exists too), one PENDING approval and one ISSUED
action token the ledger has not redeemed yet.
"""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from approvals.models import ActionToken, ApprovalRequest
from audit.models import AuditEvent
from consent.models import Agent, ScopePolicy, SessionGrant
from consent.services import agent_create
from tests.approvals.conftest import LEDGER_ENTRY
from tests.approvals.conftest import Agent as CibaAgent
from tests.approvals.support import install_outbox
from tests.conftest import REDIRECT_URI, ClientResponse, OAuthFlow, Scenario, basic
from tests.live import LiveStack

CIBA = "urn:openid:params:grant-type:ciba"
SECOND_ENTRY = {**LEDGER_ENTRY, "purchase_order": "PO-2026-0143", "amount": "99.00"}
THIRD_ENTRY = {**LEDGER_ENTRY, "purchase_order": "PO-2026-0144", "amount": "1.00"}
APPROVED_ENTRY = {**LEDGER_ENTRY, "purchase_order": "PO-2026-0145", "amount": "12.50"}
Status = ApprovalRequest.Status
T = TypeVar("T")


# --- the armed state --------------------------------------------------------------------------------


@dataclass
class Armed:
    flow: OAuthFlow
    scenario: Scenario
    ciba: CibaAgent
    officer: Client
    grant: SessionGrant
    session_token: str
    refresh_token: str
    rotated_refresh_token: str
    pending: ApprovalRequest
    pending_auth_req_id: str
    issued: ApprovalRequest
    issued_auth_req_id: str
    action_token: str
    approved: ApprovalRequest  # approved by the officer, token not collected yet
    approved_auth_req_id: str


def _ask(ciba: CibaAgent, details: dict[str, Any]) -> str:
    response = ciba.ask(details)
    assert response.status_code == 200, response.content
    auth_req_id: str = response.json()["auth_req_id"]
    return auth_req_id


@pytest.fixture
def armed(
    db: None, flow: OAuthFlow, scenario: Scenario, ledger_policy: ScopePolicy, settings: Settings
) -> Armed:  # noqa: F811
    settings.CELERY_TASK_ALWAYS_EAGER = False
    first = flow.full()
    flow.client.logout()  # from here on, flow.client is the agent (and the ledger): no session
    rotated = flow.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert rotated.status_code == 200, rotated.content
    current = rotated.json()
    assert current["refresh_token"] != first["refresh_token"]

    ciba = CibaAgent(flow, scenario)
    ciba.session_token = current["access_token"]
    officer = Client()
    officer.force_login(scenario.user)

    pending_id = _ask(ciba, LEDGER_ENTRY)
    issued_id = _ask(ciba, SECOND_ENTRY)
    approved_id = _ask(ciba, APPROVED_ENTRY)
    pending = ApprovalRequest.objects.get(authorization_details=[LEDGER_ENTRY])
    issued = ApprovalRequest.objects.get(authorization_details=[SECOND_ENTRY])
    approved = ApprovalRequest.objects.get(authorization_details=[APPROVED_ENTRY])
    assert officer.post(f"/approvals/{issued.pk}/approve/").status_code == 302
    assert officer.post(f"/approvals/{approved.pk}/approve/").status_code == 302
    collected = ciba.poll(issued_id)
    assert collected.status_code == 200, collected.content
    for approval in (pending, issued, approved):
        approval.refresh_from_db()
    assert (pending.status, issued.status, approved.status) == (
        Status.PENDING,
        Status.ISSUED,
        Status.APPROVED,
    )

    grant = SessionGrant.objects.get()
    assert flow.introspect(current["access_token"]).json()["active"] is True
    return Armed(
        flow=flow,
        scenario=scenario,
        ciba=ciba,
        officer=officer,
        grant=grant,
        session_token=current["access_token"],
        refresh_token=current["refresh_token"],
        rotated_refresh_token=first["refresh_token"],
        pending=pending,
        pending_auth_req_id=pending_id,
        issued=issued,
        issued_auth_req_id=issued_id,
        action_token=collected.json()["access_token"],
        approved=approved,
        approved_auth_req_id=approved_id,
    )


# --- admin helpers ----------------------------------------------------------------------------------


def _admin_client() -> Client:
    admin = get_user_model().objects.create_superuser("root", "root@example.test", "root-password-123")
    client = Client()
    client.force_login(admin)
    return client


class _FormValues(HTMLParser):
    """The values a browser would submit from the admin change form (id="<model>_form")."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id, self.inside = form_id, False
        self.values: list[tuple[str, str | None]] = []  # None: an attribute without a value
        self._select: str | None = None
        self._textarea: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and a.get("id") == self.form_id:
            self.inside = True
        name = a.get("name")
        if not self.inside or not name:
            if tag == "option" and self.inside and self._select and "selected" in a:
                self.values.append((self._select, a.get("value", "")))
            return
        if tag == "input":
            kind = a.get("type", "text")
            if kind in ("checkbox", "radio"):
                if "checked" in a:
                    self.values.append((name, a.get("value", "on")))
            elif kind not in ("submit", "button", "file", "image", "reset"):
                self.values.append((name, a.get("value", "")))
        elif tag == "select":
            self._select = name
        elif tag == "textarea":
            self._textarea, self._text = name, []

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self.inside:
            self.inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            self.values.append((self._textarea, "".join(self._text).lstrip("\n")))
            self._textarea = None


def _change_form(client: Client, url: str, form_id: str) -> dict[str, list[str | None]]:
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    parser = _FormValues(form_id)
    parser.feed(page.content.decode())
    data: dict[str, list[str | None]] = {}
    for name, value in parser.values:
        data.setdefault(name, []).append(value)
    assert "status" in data and "csrfmiddlewaretoken" in data, sorted(data)
    return data


# --- the revocation paths ---------------------------------------------------------------------------


def revoke_by_user(a: Armed) -> None:
    response = a.officer.post(f"/grants/{a.grant.pk}/revoke/")
    assert response.status_code == 302 and response["Location"] == "/grants/"


def revoke_by_admin_grant_action(a: Armed) -> None:
    response = _admin_client().post(
        "/admin/consent/sessiongrant/", {"action": "revoke", "_selected_action": [str(a.grant.pk)]}
    )
    assert response.status_code == 302, response.content[:2000]


def _rfc7009(a: Armed, token: str, hint: str) -> None:
    response = a.flow.client.post(
        "/o/revoke/",
        urlencode({"token": token, "token_type_hint": hint}),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(a.scenario.agent.client_id, a.scenario.agent_secret),
    )
    assert response.status_code == 200, response.content


def revoke_by_agent_access_token(a: Armed) -> None:
    _rfc7009(a, a.session_token, "access_token")


def revoke_by_agent_refresh_token(a: Armed) -> None:
    _rfc7009(a, a.refresh_token, "refresh_token")


def suspend_by_command(a: Armed) -> None:
    call_command("agent_update", a.scenario.agent.client_id, "--status", "suspended")


def suspend_by_admin_change_form(a: Armed) -> None:
    client = _admin_client()
    url = f"/admin/consent/agent/{a.scenario.agent.pk}/change/"
    data = _change_form(client, url, "agent_form")
    assert data["status"] == [Agent.Status.ACTIVE]
    data["status"] = [Agent.Status.SUSPENDED]
    data["_save"] = ["Save"]
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:4000]


def suspend_by_admin_action(a: Armed) -> None:
    response = _admin_client().post(
        "/admin/consent/agent/", {"action": "suspend", "_selected_action": [str(a.scenario.agent.pk)]}
    )
    assert response.status_code == 302, response.content[:2000]


def refresh_token_reuse(a: Armed) -> None:
    replay = a.flow.token({"grant_type": "refresh_token", "refresh_token": a.rotated_refresh_token})
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant", replay.content


@dataclass(frozen=True)
class Path:
    revoke: Callable[[Armed], None]
    reason: str
    suspends: bool = False


PATHS = {
    "user_revoke_on_grants_page": Path(revoke_by_user, "revoked_by_user"),
    "admin_sessiongrant_revoke_action": Path(revoke_by_admin_grant_action, "revoked_by_admin"),
    "rfc7009_access_token": Path(revoke_by_agent_access_token, "revoked_by_agent"),
    "rfc7009_refresh_token": Path(revoke_by_agent_refresh_token, "revoked_by_agent"),
    "agent_update_command_suspends": Path(suspend_by_command, "agent_suspended", suspends=True),
    "admin_agent_change_form_suspends": Path(suspend_by_admin_change_form, "agent_suspended", suspends=True),
    "admin_agent_suspend_action": Path(suspend_by_admin_action, "agent_suspended", suspends=True),
    "refresh_token_reuse": Path(refresh_token_reuse, "refresh_token_reused"),
}


def _error(response: ClientResponse, status: int, error: str) -> None:
    assert response.status_code == status, (response.status_code, response.content)
    assert response.json()["error"] == error, response.content


@pytest.mark.django_db
@pytest.mark.parametrize("name", list(PATHS))
def test_every_revocation_path_ends_everything_at_once(
    armed: Armed,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    path = PATHS[name]
    a = armed
    approvals_before = ApprovalRequest.objects.count()
    outbox = install_outbox(monkeypatch, run_pushes=False)

    with django_capture_on_commit_callbacks(execute=True):
        path.revoke(a)

    # The grant is over, for the stated reason.
    a.grant.refresh_from_db()
    assert a.grant.status == SessionGrant.Status.REVOKED, a.grant.status
    assert a.grant.end_reason == path.reason and a.grant.ended_at is not None
    if path.suspends:
        a.scenario.agent.refresh_from_db()
        assert a.scenario.agent.status == Agent.Status.SUSPENDED

    # Introspection: the session token is inactive, with nothing else said (RFC 7662 §2.2).
    introspected = a.flow.introspect(a.session_token)
    assert introspected.status_code == 200
    assert introspected.json() == {"active": False}

    # The ledger's redemption of the issued, unredeemed action token is refused.
    _error(a.ciba.redeem(a.action_token), 400, "invalid_token")
    assert ActionToken.objects.get(approval=a.issued).redeemed_at is None

    # Every open approval is cancelled: the pending one, the issued one (and the approved one).
    open_ones = (a.pending, a.issued, a.approved)
    for approval in open_ones:
        approval.refresh_from_db()
    assert [x.status for x in open_ones] == [Status.CANCELLED] * 3
    assert all(x.decided_at is not None for x in open_ones)
    # ... and open inboxes are told, once the revoking transaction has committed (poll mode: no ping).
    for approval in open_ones:
        assert outbox.removals_for(approval.pk) == ["cancelled"], outbox.sent

    # A further refresh fails; a suspended agent cannot even authenticate (RFC 6749 §5.2).
    refresh = a.flow.token({"grant_type": "refresh_token", "refresh_token": a.refresh_token})
    if path.suspends:
        _error(refresh, 401, "invalid_client")
    else:
        _error(refresh, 400, "invalid_grant")

    # A new CIBA request riding on the old session token is refused, and creates nothing.
    asked = a.ciba.ask(THIRD_ENTRY)
    if path.suspends:
        _error(asked, 401, "invalid_client")
    else:
        _error(asked, 403, "access_denied")
    assert ApprovalRequest.objects.count() == approvals_before

    # The agent's next poll for a cancelled request hears that it is over; nothing is minted.
    for auth_req_id in (a.pending_auth_req_id, a.approved_auth_req_id):
        polled = a.ciba.poll(auth_req_id)
        if path.suspends:
            _error(polled, 401, "invalid_client")
        else:
            _error(polled, 400, "access_denied")
    assert ActionToken.objects.count() == 1

    # Audited once, with the reason; the chain still verifies.
    rows = AuditEvent.objects.filter(event="grant.revoked", grant_id=str(a.grant.pk))
    assert rows.count() == 1
    assert rows.get().detail == {"reason": path.reason}
    cancelled = AuditEvent.objects.filter(event="approval.cancelled", grant_id=str(a.grant.pk))
    assert sorted(e.detail["approval_id"] for e in cancelled) == sorted(str(x.pk) for x in open_ones)
    call_command("audit_verify")

    # Reactivating a suspended agent revives nothing: the grant and its tokens stay dead.
    if path.suspends:
        call_command("agent_update", a.scenario.agent.client_id, "--status", "active")
        assert a.flow.introspect(a.session_token).json() == {"active": False}
        _error(a.ciba.redeem(a.action_token), 400, "invalid_token")
        _error(
            a.flow.token({"grant_type": "refresh_token", "refresh_token": a.refresh_token}),
            400,
            "invalid_grant",
        )
        _error(a.ciba.ask(THIRD_ENTRY), 403, "access_denied")
        a.grant.refresh_from_db()
        assert a.grant.status == SessionGrant.Status.REVOKED
        call_command("audit_verify")


@pytest.mark.django_db
def test_rfc7009_by_another_client_revokes_nothing(armed: Armed) -> None:
    """RFC 7009 §2.1: the server checks the token was issued to the requesting client."""
    a = armed
    other, other_secret = agent_create(
        name="Other Agent", publisher="Elsewhere", scopes=["catalog:read"], redirect_uris=[REDIRECT_URI]
    )
    for token, hint in ((a.session_token, "access_token"), (a.refresh_token, "refresh_token")):
        response = a.flow.client.post(
            "/o/revoke/",
            urlencode({"token": token, "token_type_hint": hint}),
            content_type="application/x-www-form-urlencoded",
            HTTP_AUTHORIZATION=basic(other.client_id, other_secret),
        )
        assert response.status_code == 200, response.content  # §2.2: answered alike, whatever the token
    a.grant.refresh_from_db()
    assert a.grant.status == SessionGrant.Status.ACTIVE
    assert a.flow.introspect(a.session_token).json()["active"] is True
    for approval in (a.pending, a.issued, a.approved):
        approval.refresh_from_db()
    assert (a.pending.status, a.issued.status, a.approved.status) == (
        Status.PENDING,
        Status.ISSUED,
        Status.APPROVED,
    )
    assert not AuditEvent.objects.filter(event="grant.revoked").exists()


@pytest.mark.django_db
def test_rfc7009_still_works_once_the_agent_is_required_to_use_dpop(armed: Armed) -> None:
    """An admin turns on "require DPoP" mid-session. DPoP proofs belong to the token endpoint
    (RFC 9449 §5); the revocation endpoint has none to give, so requiring one there would leave the
    agent unable to give its tokens up (RFC 7009 §2.1) -- the one thing a worried agent must do."""
    a = armed
    a.scenario.agent.require_dpop = True
    a.scenario.agent.save()
    _rfc7009(a, a.session_token, "access_token")
    a.grant.refresh_from_db()
    assert a.grant.status == SessionGrant.Status.REVOKED and a.grant.end_reason == "revoked_by_agent"
    assert a.flow.introspect(a.session_token).json() == {"active": False}
    for approval in (a.pending, a.issued, a.approved):
        approval.refresh_from_db()
        assert approval.status == Status.CANCELLED
    call_command("audit_verify")


# --- ping mode: the agent is told its request ended ------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    calls: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append({"auth": self.headers.get("Authorization"), "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _wait_for(check: Callable[[], T | None], what: str, stack: LiveStack, timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen\n{stack.logs()}")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["rfc7009_over_http", "user_revoke_on_grants_page"])
def test_ping_mode_cancellation_notifies_the_agent(
    live: LiveStack, flow: OAuthFlow, scenario: Scenario, ledger_policy: ScopePolicy, how: str
) -> None:  # noqa: F811
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    http = httpx.Client(trust_env=False, timeout=10)
    agent_auth = (scenario.agent.client_id, scenario.agent_secret)
    try:
        scenario.agent.backchannel_client_notification_endpoint = f"http://127.0.0.1:{server.server_port}/cb"
        scenario.agent.save()
        tokens = flow.full()
        flow.client.logout()
        asked = http.post(
            f"{live.url}/o/bc-authorize/",
            auth=agent_auth,
            data={
                "scope": "ledger:write",
                "login_hint_token": tokens["access_token"],
                "authorization_details": json.dumps([LEDGER_ENTRY]),
                "client_notification_token": "ping-me-456",
            },
        )
        assert asked.status_code == 200, asked.text
        auth_req_id = asked.json()["auth_req_id"]
        approval = ApprovalRequest.objects.get()
        assert (
            approval.delivery_mode == ApprovalRequest.DeliveryMode.PING and approval.status == Status.PENDING
        )
        assert _Recorder.calls == []  # nothing to collect yet: no notification while pending

        if how == "rfc7009_over_http":
            revoked = http.post(
                f"{live.url}/o/revoke/",
                auth=agent_auth,
                data={"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
            )
            assert revoked.status_code == 200, revoked.text
        else:
            officer = Client()
            officer.force_login(scenario.user)
            assert officer.post(f"/grants/{approval.grant_id}/revoke/").status_code == 302

        approval.refresh_from_db()
        assert approval.status == Status.CANCELLED
        calls = _wait_for(lambda: list(_Recorder.calls), "the ping notification", live)
        assert calls == [{"auth": "Bearer ping-me-456", "body": {"auth_req_id": auth_req_id}}]
        _wait_for(
            lambda: ApprovalRequest.objects.filter(pk=approval.pk, notified_at__isnull=False).exists(),
            "notified_at being recorded",
            live,
        )
        assert (
            AuditEvent.objects.filter(
                event="approval.agent_notified", outcome="ok", detail__approval_id=str(approval.pk)
            ).count()
            == 1
        )

        # Told to collect, the agent collects the news: the request was cancelled.
        polled = http.post(
            f"{live.url}/o/token/", auth=agent_auth, data={"grant_type": CIBA, "auth_req_id": auth_req_id}
        )
        assert polled.status_code == 400 and polled.json()["error"] == "access_denied", polled.text
        call_command("audit_verify")
    finally:
        http.close()
        server.shutdown()

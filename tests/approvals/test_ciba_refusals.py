"""Every refusal along the step-up path (SECURITY.md: Approvals, Redemption).

A refusal is a clear protocol error (right status, right ``error``), changes
nothing (no ApprovalRequest, no action token, no state change), pushes nothing to
a browser, and leaves exactly one audit row with outcome "refused". ``Watch``
snapshots all of that before the request and checks it afterwards; Celery is
replaced by an ``Outbox`` that records what the services queue on commit.
"""

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from typing import Any

import jwt
import pytest
from django.contrib.auth.models import User
from django.db.models import Max
from django.test import Client
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from approvals.models import ActionToken, ApprovalRequest
from approvals.rar import action_hash
from approvals.services import auth_req_id_hash
from approvals.tokens import mint
from audit.models import AuditEvent
from consent.models import Agent, ScopePolicy, SessionGrant
from consent.services import agent_create, agent_update, grant_revoke, scope_set
from consent.tokens import ACTION_TOKEN_TYP, SESSION_TOKEN_TYP, session_claims, sign, token_checksum, verify
from tests.approvals.conftest import LEDGER_ENTRY
from tests.approvals.conftest import Agent as CibaAgent
from tests.approvals.support import Outbox, install_outbox, ledger_entry
from tests.conftest import PASSWORD, REDIRECT_URI, ClientResponse, OAuthFlow, Scenario, pkce_pair

pytestmark = pytest.mark.django_db

S = ApprovalRequest.Status
REQUEST_REFUSED = "approval.request_refused"
TOKEN_REFUSED = "token.refused"
REDEMPTION_REFUSED = "redemption.refused"
DECISION_REFUSED = "approval.decision_refused"


# --- what a request changed ------------------------------------------------------------------------


def _head() -> int:
    return AuditEvent.objects.aggregate(m=Max("id"))["m"] or 0


def _approval_rows() -> dict[Any, list[Any]]:
    return {
        pk: rest
        for pk, *rest in ApprovalRequest.objects.values_list(
            "pk", "status", "decided_at", "decision_method", "interval", "last_polled_at", "expires_at"
        )
    }


def _token_rows() -> dict[Any, list[Any]]:
    return {
        jti: rest for jti, *rest in ActionToken.objects.values_list("jti", "redeemed_at", "redeemed_by_id")
    }


class Watch:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.seq = _head()
        self.approvals = _approval_rows()
        self.tokens = _token_rows()
        self.queued, self.sent = len(outbox.queued), len(outbox.sent)

    def events(self) -> list[AuditEvent]:
        return list(AuditEvent.objects.filter(id__gt=self.seq).order_by("id"))

    def new_queued(self) -> list[tuple[str, str]]:
        return self.outbox.queued[self.queued :]

    def new_sent(self) -> list[tuple[int, dict[str, Any]]]:
        return self.outbox.sent[self.sent :]

    def refused(
        self,
        response: ClientResponse,
        *,
        status: int,
        error: str,
        event: str,
        ok_events: Sequence[str] = (),
        unchanged: bool = True,
        reason: str = "",
    ) -> AuditEvent:
        """The response is the protocol error (and, when given, its stable ``reason``); one refused
        audit row; nothing else changed."""
        assert response.status_code == status, response.content[:500]
        body = response.json()
        assert body["error"] == error, body
        assert isinstance(body.get("reason"), str) and body["reason"], body
        if reason:
            assert body["reason"] == reason, body
        events = self.events()
        refused = [e for e in events if e.outcome == AuditEvent.Outcome.REFUSED]
        assert [(e.event, e.error) for e in refused] == [(event, error)], [
            (e.event, e.error, e.detail) for e in events
        ]
        assert [e.event for e in events if e.outcome == AuditEvent.Outcome.OK] == list(ok_events)
        if unchanged:
            self.assert_unchanged()
        return refused[0]

    def assert_unchanged(self) -> None:
        assert _approval_rows() == self.approvals, "a refusal must not create or change an approval"
        assert _token_rows() == self.tokens, "a refusal must not mint or redeem an action token"
        assert self.new_queued() == [] and self.new_sent() == [], "a refusal must push nothing"


Watching = Callable[[], AbstractContextManager[Watch]]  # the ``watch`` fixture


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> Outbox:
    return install_outbox(monkeypatch)


@pytest.fixture
def watch(django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks, outbox: Outbox) -> Watching:
    @contextmanager
    def _watch() -> Iterator[Watch]:
        w = Watch(outbox)
        with django_capture_on_commit_callbacks(execute=True):
            yield w

    return _watch


# --- helpers ------------------------------------------------------------------------------------------


def _approval_for(auth_req_id: str) -> ApprovalRequest:
    return ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(auth_req_id))


def _ask_ok(
    agent: CibaAgent, details: dict[str, Any] | None = None, **extra: Any
) -> tuple[str, ApprovalRequest]:
    response = agent.ask(details, **extra)
    assert response.status_code == 200, response.content
    auth_req_id = response.json()["auth_req_id"]
    return auth_req_id, _approval_for(auth_req_id)


def _decide(
    client: Client, approval: ApprovalRequest, verb: str = "approve", user: User | None = None
) -> ClientResponse:
    client.force_login(user or approval.user)
    return client.post(f"/approvals/{approval.pk}/{verb}/")


def _action_token(
    agent: CibaAgent, client: Client, details: dict[str, Any] | None = None
) -> tuple[str, ApprovalRequest]:
    """Ask, approve in the browser, collect: a real action token for the ledger."""
    auth_req_id, approval = _ask_ok(agent, details)
    assert _decide(client, approval).status_code == 302
    client.logout()
    response = agent.poll(auth_req_id)
    assert response.status_code == 200, response.content
    return str(response.json()["access_token"]), approval


def _other_agent(name: str = "Other Agent") -> tuple[Agent, str]:
    return agent_create(
        name=name,
        publisher="Elsewhere Inc",
        scopes=["catalog:read", "ledger:write"],
        redirect_uris=[REDIRECT_URI],
    )


def _session_token_for(flow: OAuthFlow, agent: Agent, secret: str, scope: str) -> str:
    """The authorization-code flow for ``agent`` (the officer consents), returning its session token."""
    flow.login()
    verifier, challenge = pkce_pair()
    code = flow.code_from(
        flow.consent(flow.authorize_query(scope=scope, challenge=challenge, client_id=agent.client_id))
    )
    response = flow.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        auth=(agent.client_id, secret),
    )
    assert response.status_code == 200, response.content
    flow.client.logout()
    return str(response.json()["access_token"])


def _grant_of(agent: CibaAgent) -> SessionGrant:
    claims = verify(agent.session_token, typ=SESSION_TOKEN_TYP)
    return SessionGrant.objects.get(pk=claims["grant_id"])


# =====================================================================================================
# /o/bc-authorize/
# =====================================================================================================


@pytest.mark.parametrize("credentials", ["unknown client", "wrong secret", "empty secret"])
def test_client_authentication_failure_is_invalid_client(
    agent: CibaAgent, scenario: Scenario, watch: Watching, credentials: str
) -> None:
    auth = {
        "unknown client": ("no-such-client", scenario.agent_secret),
        "wrong secret": (scenario.agent.client_id, scenario.agent_secret + "x"),
        "empty secret": (scenario.agent.client_id, ""),
    }[credentials]
    with watch() as w:
        response = agent.ask(auth=auth)
    row = w.refused(response, status=401, error="invalid_client", event=REQUEST_REFUSED)
    assert response["WWW-Authenticate"].startswith("Basic")
    assert row.client_id == auth[0]


def test_suspended_agent_fails_client_authentication(
    agent: CibaAgent, scenario: Scenario, watch: Watching
) -> None:
    agent_update(agent=scenario.agent, changes={"status": Agent.Status.SUSPENDED})
    with watch() as w:
        response = agent.ask()
    w.refused(response, status=401, error="invalid_client", event=REQUEST_REFUSED)


@pytest.mark.parametrize(
    "scope",
    [
        "catalog:read",  # a standard scope: rides on the session token, never stepped up
        "ledger:write catalog:read",  # two scopes
        "ledger:write ledger:write",  # the same scope twice is still two
        "",  # none
        "nope:write",  # no such scope
    ],
)
def test_scope_must_be_exactly_one_step_up_scope(agent: CibaAgent, watch: Watching, scope: str) -> None:
    with watch() as w:
        response = agent.ask(scope=scope)
    w.refused(response, status=400, error="invalid_scope", event=REQUEST_REFUSED)


def test_step_up_scope_outside_the_agents_registry(agent: CibaAgent, watch: Watching) -> None:
    scope_set(
        name="payments:send",
        values={
            "audience": "http://payments.test",
            "sensitivity": ScopePolicy.Sensitivity.STEP_UP,
            "authorization_details_types": ["ledger_entry"],
        },
    )
    with watch() as w:
        response = agent.ask(scope="payments:send")
    w.refused(response, status=400, error="invalid_scope", event=REQUEST_REFUSED)


def test_step_up_scope_outside_the_session_grant(agent: CibaAgent, watch: Watching) -> None:
    # The officer consented without ledger:write this time.
    agent.session_token = agent.flow.full(scope="catalog:read budget:read")["access_token"]
    agent.flow.client.logout()
    assert _grant_of(agent).step_up_scopes == []
    with watch() as w:
        response = agent.ask()
    w.refused(response, status=400, error="invalid_scope", event=REQUEST_REFUSED)


def test_missing_login_hint_token(agent: CibaAgent, watch: Watching) -> None:
    agent.session_token = ""
    with watch() as w:
        response = agent.ask()
    w.refused(response, status=400, error="invalid_request", event=REQUEST_REFUSED)


def test_login_hint_token_that_is_not_a_session_token(
    agent: CibaAgent, scenario: Scenario, watch: Watching
) -> None:
    grant = _grant_of(agent)
    claims = session_claims(
        grant=grant, client_id=scenario.agent.client_id, scopes=["catalog:read"], expires_in=600
    )
    for hint in ["not-a-jwt", sign(claims, typ=ACTION_TOKEN_TYP), agent.session_token[:-4] + "AAAA"]:
        agent.session_token = hint
        with watch() as w:
            response = agent.ask()
        w.refused(response, status=400, error="invalid_request", event=REQUEST_REFUSED)


def test_login_hint_token_of_another_agent(agent: CibaAgent, scenario: Scenario, watch: Watching) -> None:
    other, other_secret = _other_agent()
    agent.session_token = _session_token_for(agent.flow, other, other_secret, "catalog:read ledger:write")
    with watch() as w:
        response = agent.ask()
    w.refused(response, status=400, error="invalid_request", event=REQUEST_REFUSED)


def test_expired_login_hint_token(agent: CibaAgent, scenario: Scenario, watch: Watching) -> None:
    claims = session_claims(
        grant=_grant_of(agent),
        client_id=scenario.agent.client_id,
        scopes=["catalog:read", "budget:read"],
        expires_in=600,
    )
    claims["iat"], claims["exp"] = claims["iat"] - 3600, claims["iat"] - 120  # issued an hour ago, 900 s TTL
    agent.session_token = sign(claims, typ=SESSION_TOKEN_TYP)
    with watch() as w:
        response = agent.ask()
    w.refused(response, status=400, error="expired_login_hint_token", event=REQUEST_REFUSED)


def test_revoked_grant_is_access_denied(agent: CibaAgent, scenario: Scenario, watch: Watching) -> None:
    grant = _grant_of(agent)
    assert grant_revoke(grant_id=grant.pk, reason="revoked_by_user", actor=f"user:{scenario.user.pk}")
    with watch() as w:
        response = agent.ask()
    # CIBA Core §13: access_denied from the backchannel authentication endpoint is HTTP 403.
    w.refused(response, status=403, error="access_denied", event=REQUEST_REFUSED)


def test_grant_past_its_lifetime_is_access_denied(agent: CibaAgent, watch: Watching) -> None:
    SessionGrant.objects.filter(pk=_grant_of(agent).pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    with watch() as w:
        response = agent.ask()
    w.refused(response, status=403, error="access_denied", event=REQUEST_REFUSED)


OVERSIZED = json.dumps([ledger_entry(note="x" * 8200)])

BAD_DETAILS = {
    "missing": "",
    "not JSON": "[{not json",
    "not an array": json.dumps(LEDGER_ENTRY),
    "empty array": "[]",
    "entry not an object": json.dumps(["ledger_entry"]),
    "entry without type": json.dumps([{k: v for k, v in LEDGER_ENTRY.items() if k != "type"}]),
    "type not a string": json.dumps([{**LEDGER_ENTRY, "type": 7}]),
    "unknown type": json.dumps([{**LEDGER_ENTRY, "type": "payment_initiation"}]),
    "one good entry, one unknown type": json.dumps([LEDGER_ENTRY, {"type": "payment_initiation"}]),
    "float amount": json.dumps([{**LEDGER_ENTRY, "amount": 4250.5}]),
    "nested float": json.dumps([{**LEDGER_ENTRY, "lines": [{"amount": 0.1}]}]),
    "NaN constant": '[{"type": "ledger_entry", "amount": NaN}]',
    "too many entries": json.dumps([LEDGER_ENTRY] * 11),
    "oversized (> 8 KB)": OVERSIZED,
}


@pytest.mark.parametrize("case", list(BAD_DETAILS))
def test_malformed_authorization_details(agent: CibaAgent, watch: Watching, case: str) -> None:
    if case == "oversized (> 8 KB)":
        assert len(OVERSIZED.encode()) > 8192 and json.loads(OVERSIZED)[0]["type"] == "ledger_entry"
    with watch() as w:
        response = agent.ask(authorization_details=BAD_DETAILS[case])
    w.refused(response, status=400, error="invalid_authorization_details", event=REQUEST_REFUSED)


@pytest.mark.parametrize(
    "message",
    [
        "x" * 121,
        "Step 5 of 5 \x07",
        "Pay \u202eDSU 00.0524",  # right-to-left override: what the user reads is not what was sent
        "line one\nline two",
        "zero\u200bwidth",
    ],
)
def test_bad_binding_message(agent: CibaAgent, watch: Watching, message: str) -> None:
    with watch() as w:
        response = agent.ask(binding_message=message)
    w.refused(response, status=400, error="invalid_binding_message", event=REQUEST_REFUSED)


def test_binding_message_of_exactly_the_limit_is_accepted(agent: CibaAgent) -> None:
    _, approval = _ask_ok(agent, binding_message="y" * 120)
    assert approval.binding_message == "y" * 120


@pytest.mark.parametrize("requested_expiry", ["abc", "0", "-5", "1.5", "60s"])
def test_invalid_requested_expiry(agent: CibaAgent, watch: Watching, requested_expiry: str) -> None:
    with watch() as w:
        response = agent.ask(requested_expiry=requested_expiry)
    w.refused(response, status=400, error="invalid_request", event=REQUEST_REFUSED)


def test_requested_expiry_never_extends_the_admin_window(agent: CibaAgent) -> None:
    response = agent.ask(requested_expiry="86400")
    assert response.status_code == 200 and response.json()["expires_in"] <= 600
    short = agent.ask(ledger_entry("1.00"), requested_expiry="120")
    assert short.status_code == 200 and 110 <= short.json()["expires_in"] <= 120


@pytest.mark.parametrize("cap", ["MAX_PENDING_PER_USER", "MAX_PENDING_PER_AGENT"])
def test_too_many_pending_is_temporarily_unavailable(
    agent: CibaAgent, client: Client, settings: Settings, watch: Watching, cap: str
) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, cap: 2}
    _, first = _ask_ok(agent, ledger_entry("1.00"))
    _ask_ok(agent, ledger_entry("2.00"))
    with watch() as w:
        response = agent.ask(ledger_entry("3.00"))
    w.refused(response, status=429, error="temporarily_unavailable", event=REQUEST_REFUSED)
    assert ApprovalRequest.objects.count() == 2
    # Once the user answers one, there is room again.
    _decide(client, first, "deny")
    _ask_ok(agent, ledger_entry("3.00"))


def test_identical_pending_request_collapses_into_one(
    agent: CibaAgent, outbox: Outbox, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = agent.ask(binding_message="Step 5 of 5")
    with django_capture_on_commit_callbacks(execute=True):
        second = agent.ask(binding_message="Step 5 of 5")
    assert first.status_code == second.status_code == 200
    assert first.json()["auth_req_id"] == second.json()["auth_req_id"]
    approval = ApprovalRequest.objects.get()
    assert outbox.queued_for(approval.pk, "deliver_prompt") == ["deliver_prompt"]
    assert len(outbox.prompts_sent()) == 1
    assert list(
        AuditEvent.objects.filter(event="approval.requested").values_list("detail__approval_id", flat=True)
    ) == [str(approval.pk)]
    # A different amount is a different action: its own prompt.
    other = agent.ask(ledger_entry("4251.00"))
    assert other.status_code == 200 and other.json()["auth_req_id"] != first.json()["auth_req_id"]
    assert ApprovalRequest.objects.count() == 2


def test_identical_request_after_a_decision_is_a_new_prompt(agent: CibaAgent, client: Client) -> None:
    auth_req_id, approval = _ask_ok(agent)
    _decide(client, approval, "deny")
    again, fresh = _ask_ok(agent)
    assert again != auth_req_id and fresh.pk != approval.pk and fresh.status == S.PENDING


def test_identical_request_after_the_window_passed_expires_the_old_one_properly(
    agent: CibaAgent, outbox: Outbox, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    auth_req_id, old = _ask_ok(agent)
    ApprovalRequest.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        again, fresh = _ask_ok(agent)
    assert again != auth_req_id and fresh.pk != old.pk
    old.refresh_from_db()
    assert old.status == S.EXPIRED
    # The old prompt's end is a transition like any other: audited, and open inboxes are told.
    assert AuditEvent.objects.filter(event="approval.expired", detail__approval_id=str(old.pk)).count() == 1
    assert outbox.removals_for(old.pk) == ["expired"]


# =====================================================================================================
# token endpoint, grant_type=urn:openid:params:grant-type:ciba
# =====================================================================================================


def test_auth_req_id_of_another_client_is_invalid_grant(agent: CibaAgent, watch: Watching) -> None:
    auth_req_id, approval = _ask_ok(agent)
    other, other_secret = _other_agent()
    with watch() as w:
        response = agent.poll(auth_req_id, auth=(other.client_id, other_secret))
    w.refused(response, status=400, error="invalid_grant", event=TOKEN_REFUSED)
    # The stranger's poll did not count against the owner's polling interval.
    first = agent.poll(auth_req_id)
    assert first.json()["error"] == "authorization_pending"


@pytest.mark.parametrize("auth_req_id", ["0" * 64, "not-an-id", "x" * 5000])
def test_unknown_auth_req_id_is_invalid_grant(agent: CibaAgent, watch: Watching, auth_req_id: str) -> None:
    _ask_ok(agent)
    with watch() as w:
        response = agent.poll(auth_req_id)
    w.refused(response, status=400, error="invalid_grant", event=TOKEN_REFUSED)


def test_missing_auth_req_id_is_invalid_request(agent: CibaAgent, watch: Watching) -> None:
    with watch() as w:
        response = agent.flow.token({"grant_type": "urn:openid:params:grant-type:ciba"})
    w.refused(response, status=400, error="invalid_request", event=TOKEN_REFUSED)


def test_polling_too_fast_is_slow_down_and_the_interval_grows_by_5(agent: CibaAgent, watch: Watching) -> None:
    auth_req_id, approval = _ask_ok(agent)
    assert approval.interval == 5
    assert agent.poll(auth_req_id).json()["error"] == "authorization_pending"

    with watch() as w:
        response = agent.poll(auth_req_id)
    w.refused(response, status=400, error="slow_down", event=TOKEN_REFUSED, unchanged=False)
    approval.refresh_from_db()
    assert approval.interval == 10 and approval.status == S.PENDING

    # 7 s later is fine under the old interval, too soon under the new one.
    ApprovalRequest.objects.filter(pk=approval.pk).update(
        last_polled_at=timezone.now() - timedelta(seconds=7)
    )
    assert agent.poll(auth_req_id).json()["error"] == "slow_down"
    approval.refresh_from_db()
    assert approval.interval == 15

    ApprovalRequest.objects.filter(pk=approval.pk).update(
        last_polled_at=timezone.now() - timedelta(seconds=16)
    )
    assert agent.poll(auth_req_id).json()["error"] == "authorization_pending"
    assert ActionToken.objects.count() == 0


def test_expired_request_is_expired_token(agent: CibaAgent, watch: Watching) -> None:
    auth_req_id, approval = _ask_ok(agent)
    ApprovalRequest.objects.filter(pk=approval.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with watch() as w:
        response = agent.poll(auth_req_id)
    w.refused(
        response,
        status=400,
        error="expired_token",
        event=TOKEN_REFUSED,
        ok_events=["approval.expired"],
        unchanged=False,
        reason="window_passed",
    )
    approval.refresh_from_db()
    assert approval.status == S.EXPIRED and ActionToken.objects.count() == 0
    # The inbox is told (by this process, no task needed); nothing is prompted.
    assert w.new_queued() == [] and [m["type"] for _, m in w.new_sent()] == ["approval.remove"]
    assert agent.poll(auth_req_id).json()["error"] == "expired_token"


def test_denied_is_access_denied_with_400(agent: CibaAgent, client: Client, watch: Watching) -> None:
    auth_req_id, approval = _ask_ok(agent)
    _decide(client, approval, "deny")
    with watch() as w:
        response = agent.poll(auth_req_id)
    w.refused(response, status=400, error="access_denied", event=TOKEN_REFUSED, reason="denied")
    assert ActionToken.objects.count() == 0


def test_second_collection_is_invalid_grant(agent: CibaAgent, client: Client, watch: Watching) -> None:
    auth_req_id, approval = _ask_ok(agent)
    _decide(client, approval)
    assert agent.poll(auth_req_id).status_code == 200
    with watch() as w:
        response = agent.poll(auth_req_id)
    w.refused(response, status=400, error="invalid_grant", event=TOKEN_REFUSED)
    assert ActionToken.objects.count() == 1


# =====================================================================================================
# the user's decision: /approvals/<id>/approve|deny|confirm/
# =====================================================================================================


def _state(approval: ApprovalRequest) -> tuple[str, datetime | None, int | None]:
    row = ApprovalRequest.objects.get(pk=approval.pk)
    return row.status, row.decided_at, row.decided_by_id


@pytest.mark.parametrize("verb", ["approve", "deny"])
def test_decisions_are_post_only(agent: CibaAgent, client: Client, scenario: Scenario, verb: str) -> None:
    _, approval = _ask_ok(agent)
    client.force_login(scenario.user)
    before = _state(approval)
    assert client.get(f"/approvals/{approval.pk}/{verb}/").status_code == 405
    assert _state(approval) == before and before[0] == S.PENDING
    assert ActionToken.objects.count() == 0


def test_decisions_need_a_csrf_token(agent: CibaAgent, scenario: Scenario) -> None:
    _, approval = _ask_ok(agent)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(scenario.user)
    for verb in ("approve", "deny", "confirm"):
        assert browser.post(f"/approvals/{approval.pk}/{verb}/", {"secret": PASSWORD}).status_code == 403
    assert _state(approval)[0] == S.PENDING
    # The same browser with the token from the inbox page succeeds: the 403 was the missing token.
    assert browser.get("/approvals/").status_code == 200
    token = browser.cookies["csrftoken"].value
    assert (
        browser.post(f"/approvals/{approval.pk}/approve/", {"csrfmiddlewaretoken": token}).status_code == 302
    )
    assert _state(approval)[0] == S.APPROVED


def test_another_users_approval_is_404_and_unchanged(
    agent: CibaAgent,
    client: Client,
    django_user_model: type[User],
    watch: Watching,
) -> None:
    _, approval = _ask_ok(agent)
    mallory = django_user_model.objects.create_user("mallory", password="another strong passphrase")
    client.force_login(mallory)
    before = _state(approval)
    for method, verb in [("post", "approve"), ("post", "deny"), ("get", "confirm"), ("post", "confirm")]:
        with watch() as w:
            response = getattr(client, method)(f"/approvals/{approval.pk}/{verb}/", {"secret": "x"})
        assert response.status_code == 404, (method, verb)
        refused = [e for e in w.events() if e.outcome == AuditEvent.Outcome.REFUSED]
        assert [(e.event, e.actor) for e in refused] == [(DECISION_REFUSED, f"user:{mallory.pk}")]
        w.assert_unchanged()
    assert _state(approval) == before
    # Not even a hint in mallory's inbox.
    assert str(approval.pk).encode() not in client.get("/approvals/").content


def test_approve_after_expiry_is_refused_and_mints_nothing(
    agent: CibaAgent, client: Client, watch: Watching
) -> None:
    auth_req_id, approval = _ask_ok(agent)
    ApprovalRequest.objects.filter(pk=approval.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with watch() as w:
        response = _decide(client, approval)
    assert response.status_code == 302
    refused = [e for e in w.events() if e.outcome == AuditEvent.Outcome.REFUSED]
    assert [e.event for e in refused] == [DECISION_REFUSED]
    assert [e.event for e in w.events() if e.outcome == AuditEvent.Outcome.OK] == []
    assert _state(approval)[0] != S.APPROVED and ActionToken.objects.count() == 0
    client.logout()
    assert agent.poll(auth_req_id).json()["error"] == "expired_token"
    assert ActionToken.objects.count() == 0


def test_approve_after_the_grant_was_revoked_is_refused(
    agent: CibaAgent, client: Client, scenario: Scenario, watch: Watching
) -> None:
    auth_req_id, approval = _ask_ok(agent)
    grant_revoke(grant_id=approval.grant_id, reason="revoked_by_user", actor=f"user:{scenario.user.pk}")
    assert _state(approval)[0] == S.CANCELLED  # the revocation already cancelled it
    with watch() as w:
        response = _decide(client, approval)
    assert response.status_code == 302
    assert [e.event for e in w.events()] == [DECISION_REFUSED]
    w.assert_unchanged()
    client.logout()
    body = agent.poll(auth_req_id).json()
    assert body["error"] == "access_denied" and body["reason"] == "cancelled"  # the SDK: GrantRevoked
    assert ActionToken.objects.count() == 0


@pytest.fixture
def fresh_auth_policy(ledger_policy: ScopePolicy) -> ScopePolicy:
    ledger_policy.fresh_auth_seconds = 60
    ledger_policy.save()
    return ledger_policy


def test_fresh_authentication_before_approving(
    agent: CibaAgent,
    client: Client,
    scenario: Scenario,
    fresh_auth_policy: ScopePolicy,
    watch: Watching,
) -> None:
    auth_req_id, approval = _ask_ok(agent)
    client.force_login(scenario.user)
    session = client.session
    session["cs_auth_time"] = time.time() - 3600
    session["cs_amr"] = ["pwd"]
    session.save()

    response = client.post(f"/approvals/{approval.pk}/approve/")
    assert response.status_code == 302 and response["Location"] == f"/approvals/{approval.pk}/confirm/"
    assert _state(approval)[0] == S.PENDING
    page = client.get(response["Location"])
    assert page.status_code == 200 and b"Your password" in page.content

    with watch() as w:
        wrong = client.post(f"/approvals/{approval.pk}/confirm/", {"secret": "not the password"})
    assert wrong.status_code == 200 and _state(approval)[0] == S.PENDING
    refused = [e for e in w.events() if e.outcome == AuditEvent.Outcome.REFUSED]
    assert [(e.event, e.error) for e in refused] == [("approval.reauth_failed", "invalid_credentials")]
    w.assert_unchanged()

    right = client.post(f"/approvals/{approval.pk}/confirm/", {"secret": PASSWORD})
    assert right.status_code == 302 and _state(approval)[0] == S.APPROVED
    client.logout()
    token = agent.poll(auth_req_id).json()["access_token"]
    claims = verify(token, typ=ACTION_TOKEN_TYP)
    assert fresh_auth_policy.fresh_auth_seconds is not None
    assert claims["auth_time"] >= int(time.time()) - fresh_auth_policy.fresh_auth_seconds
    assert "pwd" in claims["amr"]


@pytest.fixture
def auto_rule(ledger_policy: ScopePolicy) -> str:
    scope_set(name="ledger:write", values={"auto_approve_rule": "amount <= 10000"})
    return "amount <= 10000"


def test_auto_approve_within_the_rule(
    agent: CibaAgent,
    auto_rule: str,
    outbox: Outbox,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = agent.ask(ledger_entry("4250.00"))
    assert response.status_code == 200
    approval = _approval_for(response.json()["auth_req_id"])
    assert approval.status == S.APPROVED and approval.decision_method == "auto_rule"
    assert approval.delivered_at is None
    assert outbox.queued_for(approval.pk, "deliver_prompt") == [] and outbox.prompts_sent() == []
    auto = AuditEvent.objects.get(event="approval.auto_approved")
    assert auto.detail["rule"] == auto_rule and auto.detail["approval_id"] == str(approval.pk)
    first = agent.poll(response.json()["auth_req_id"])
    assert first.status_code == 200, first.content
    assert verify(first.json()["access_token"], typ=ACTION_TOKEN_TYP)["approval_id"] == str(approval.pk)


def test_auto_approve_above_the_rule_prompts(
    agent: CibaAgent,
    auto_rule: str,
    outbox: Outbox,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = agent.ask(ledger_entry("10000.01"))
    assert response.status_code == 200
    approval = _approval_for(response.json()["auth_req_id"])
    assert approval.status == S.PENDING
    assert outbox.queued_for(approval.pk, "deliver_prompt") == ["deliver_prompt"]
    assert [p["prompt"]["id"] for p in outbox.prompts_sent()] == [str(approval.pk)]
    approval.refresh_from_db()
    assert approval.delivered_at is not None
    assert not AuditEvent.objects.filter(event="approval.auto_approved").exists()
    assert agent.poll(response.json()["auth_req_id"]).json()["error"] == "authorization_pending"


def test_auto_approve_cannot_be_reached_by_splitting_the_amount(agent: CibaAgent, auto_rule: str) -> None:
    """Ten entries of 9,999.00 are one 99,990.00 action: split purchases must not slip under the rule."""
    response = agent.ask(
        authorization_details=json.dumps([ledger_entry("9999.00", line=i) for i in range(10)])
    )
    assert response.status_code == 200
    approval = _approval_for(response.json()["auth_req_id"])
    assert approval.status == S.PENDING, "a split purchase was auto-approved"
    assert agent.poll(response.json()["auth_req_id"]).json()["error"] == "authorization_pending"


@pytest.mark.parametrize("amount", ["NaN", "sNaN", "-Infinity"])
def test_auto_approve_never_matches_a_non_finite_amount(
    agent: CibaAgent, auto_rule: str, amount: str
) -> None:
    agent.flow.client.raise_request_exception = False
    response = agent.ask(ledger_entry(amount))
    assert response.status_code == 200, response.content[:300]
    approval = _approval_for(response.json()["auth_req_id"])
    assert approval.status == S.PENDING


# =====================================================================================================
# /o/redeem/
# =====================================================================================================


@pytest.mark.parametrize(
    "credentials", ["wrong secret", "unknown resource server", "agent credentials", "none"]
)
def test_resource_server_authentication_failure(
    agent: CibaAgent,
    client: Client,
    scenario: Scenario,
    watch: Watching,
    credentials: str,
) -> None:
    token, approval = _action_token(agent, client)
    auth = {
        "wrong secret": (scenario.ledger_client_id, scenario.ledger_secret + "x"),
        "unknown resource server": ("rs_nobody", scenario.ledger_secret),
        "agent credentials": (scenario.agent.client_id, scenario.agent_secret),
        "none": None,
    }[credentials]
    with watch() as w:
        if auth is None:
            response = client.post("/o/redeem/", {"token": token})
        else:
            response = agent.redeem(token, auth=auth)
    w.refused(response, status=401, error="invalid_client", event=REDEMPTION_REFUSED)
    assert agent.redeem(token).status_code == 200  # the refusal did not burn the token


def test_resource_server_of_another_audience_is_invalid_target(
    agent: CibaAgent, client: Client, scenario: Scenario, watch: Watching
) -> None:
    token, approval = _action_token(agent, client)
    with watch() as w:
        response = agent.redeem(token, auth=(scenario.rs_client_id, scenario.rs_secret))
    w.refused(response, status=400, error="invalid_target", event=REDEMPTION_REFUSED)
    assert agent.redeem(token).status_code == 200


def test_session_token_at_redemption_is_invalid_token(agent: CibaAgent, watch: Watching) -> None:
    with watch() as w:
        response = agent.redeem(agent.session_token)
    w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)


def test_tampered_action_token_is_invalid_token(agent: CibaAgent, client: Client, watch: Watching) -> None:
    token, approval = _action_token(agent, client)
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["authorization_details"][0]["amount"] = "9250.00"
    forged_payload = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    with watch() as w:
        response = agent.redeem(f"{header}.{forged_payload}.{signature}")
    w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)


def _forgeries(token: str) -> dict[str, str]:
    """Tokens with the real one's ``jti`` that pass every check but the signature (redemption proves
    its tokens by their recorded digest, not by the signature: these must not get through)."""
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["authorization_details"][0]["amount"] = "9250.00"
    claims["action_hash"] = action_hash(claims["authorization_details"])  # consistent with the new amount
    coherent = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    other_signature = jwt.utils.base64url_encode(bytes(64)).decode()
    return {
        "another signature": f"{header}.{payload}.{other_signature}",
        "coherent claims": f"{header}.{coherent}.{signature}",
    }


@pytest.mark.parametrize("forgery", ["another signature", "coherent claims"])
def test_a_forged_token_with_a_real_jti_is_refused_by_its_signature_and_spends_nothing(
    agent: CibaAgent, client: Client, watch: Watching, forgery: str
) -> None:
    token, approval = _action_token(agent, client)
    with watch() as w:
        response = agent.redeem(_forgeries(token)[forgery])
    row = w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)
    assert response.json()["error_description"] == "invalid token: Signature verification failed"
    assert row.user_id is None and "approval_id" not in row.detail  # unverified claims name no one
    assert agent.redeem(token).status_code == 200  # the real token is still the one that redeems


def test_a_token_minted_before_digests_were_recorded_redeems_once_by_its_signature(
    agent: CibaAgent, client: Client, watch: Watching
) -> None:
    token, approval = _action_token(agent, client)
    ActionToken.objects.update(token_checksum="")  # as the rows minted before the column existed
    won = agent.redeem(token)
    assert won.status_code == 200, won.content
    assert won.json()["approval_id"] == str(approval.pk)
    with watch() as w:
        again = agent.redeem(token)
    w.refused(again, status=400, error="invalid_token", event=REDEMPTION_REFUSED, reason="already_redeemed")


def test_a_collected_token_is_recorded_by_its_digest(agent: CibaAgent, client: Client) -> None:
    token, approval = _action_token(agent, client)
    assert ActionToken.objects.get().token_checksum == token_checksum(token)


def test_action_token_at_introspection_is_active_only_to_its_own_resource_server(
    agent: CibaAgent, client: Client, scenario: Scenario
) -> None:
    token, approval = _action_token(agent, client)
    seq = _head()
    mine = agent.flow.introspect(token, auth=(scenario.ledger_client_id, scenario.ledger_secret)).json()
    assert mine["active"] is True and mine["approval_id"] == str(approval.pk)
    assert agent.flow.introspect(token).json() == {"active": False}
    assert ActionToken.objects.get().redeemed_at is None  # introspection spends nothing
    assert AuditEvent.objects.filter(id__gt=seq, outcome="refused").count() == 1


def test_expired_action_token_jwt_is_refused(agent: CibaAgent, client: Client, watch: Watching) -> None:
    token, approval = _action_token(agent, client)
    claims = verify(token, typ=ACTION_TOKEN_TYP)
    claims["iat"], claims["exp"] = claims["iat"] - 600, claims["iat"] - 480  # the same token, ten minutes on
    with watch() as w:
        response = agent.redeem(mint(claims))
    w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)
    assert ActionToken.objects.get().redeemed_at is None


def test_action_token_past_its_recorded_expiry_is_refused(
    agent: CibaAgent, client: Client, watch: Watching
) -> None:
    token, approval = _action_token(agent, client)
    ActionToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with watch() as w:
        response = agent.redeem(token)
    w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)
    assert ActionToken.objects.get().redeemed_at is None


def test_grant_revoked_between_collection_and_redemption(
    agent: CibaAgent, client: Client, scenario: Scenario, watch: Watching
) -> None:
    token, approval = _action_token(agent, client)
    grant_revoke(grant_id=approval.grant_id, reason="revoked_by_user", actor=f"user:{scenario.user.pk}")
    assert _state(approval)[0] == S.CANCELLED
    with watch() as w:
        response = agent.redeem(token)
    w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)
    assert ActionToken.objects.get().redeemed_at is None


@pytest.mark.parametrize("how", ["agent_update", "bulk status change"])
def test_agent_suspended_between_collection_and_redemption(
    agent: CibaAgent, client: Client, scenario: Scenario, watch: Watching, how: str
) -> None:
    token, approval = _action_token(agent, client)
    if how == "agent_update":
        agent_update(agent=scenario.agent, changes={"status": Agent.Status.SUSPENDED})
    else:  # e.g. an admin bulk action: the grant stays active, the agent check alone must refuse
        Agent.objects.filter(pk=scenario.agent.pk).update(status=Agent.Status.SUSPENDED)
    with watch() as w:
        response = agent.redeem(token)
    w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)
    assert ActionToken.objects.get().redeemed_at is None


def test_a_different_action_hash_is_refused_and_not_redeemed(
    agent: CibaAgent, client: Client, watch: Watching
) -> None:
    token, approval = _action_token(agent, client)
    for changed in ({**LEDGER_ENTRY, "amount": "9250.00"}, {**LEDGER_ENTRY, "vendor": "Mallory Supply"}):
        with watch() as w:
            response = agent.redeem(token, action_hash=action_hash([changed]))
        w.refused(response, status=400, error="invalid_request", event=REDEMPTION_REFUSED)
        assert ActionToken.objects.get().redeemed_at is None and _state(approval)[0] == S.ISSUED
    ok = agent.redeem(token, action_hash=action_hash([LEDGER_ENTRY]))
    assert ok.status_code == 200 and _state(approval)[0] == S.REDEEMED


def test_second_redemption_is_refused(agent: CibaAgent, client: Client, watch: Watching) -> None:
    token, approval = _action_token(agent, client)
    assert agent.redeem(token).status_code == 200
    with watch() as w:
        response = agent.redeem(token)
    w.refused(response, status=400, error="invalid_token", event=REDEMPTION_REFUSED)

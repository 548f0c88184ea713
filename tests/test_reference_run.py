"""The reference scenario end to end, with a controllable clock, in every refresh mode.

One consent at minute 0; steps 1-4 on the blanket session token; step 5 (the ledger
write, step-up approved by the officer) at minute 18, with a 15-minute token TTL.
A real Celery worker (in this process, so it shares the clock) delivers the prompt
over the real Redis broker and channel layer.
"""

import json
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import pytest
import time_machine
from celery.contrib.testing.worker import start_worker
from django.core.management import call_command
from django.test import Client

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from config.celery import app as celery_app
from consent.models import Agent, ScopePolicy
from consent.services import resource_server_create, scope_set
from tests.approvals.conftest import LEDGER_ENTRY
from tests.conftest import PASSWORD, OAuthFlow, Scenario, basic
from tests.consent.test_token_exchange import AgentKey, _exchange

pytestmark = pytest.mark.django_db(transaction=True)

MINUTE = 60
STEPS = [
    ("catalog:read", "http://catalog.test"),
    ("budget:read", "http://budget.test"),
    ("po:draft", "http://drafting.test"),
    ("approval:route", "http://routing.test"),
]


@pytest.fixture
def worker() -> Iterator[None]:
    celery_app.control.purge()
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        yield


@pytest.fixture
def procurement(scenario: Scenario, ledger_policy: ScopePolicy) -> dict[str, tuple[str, str]]:
    """The scenario's five systems: two more standard scopes beside catalog, budget and ledger."""
    servers = {
        "http://catalog.test": (scenario.rs_client_id, scenario.rs_secret),
        "http://ledger.test": (scenario.ledger_client_id, scenario.ledger_secret),
    }
    for scope, audience in STEPS:
        if not ScopePolicy.objects.filter(name=scope).exists():
            scope_set(
                name=scope, values={"audience": audience, "sensitivity": "standard", "description": scope}
            )
        if audience not in servers:
            rs, secret = resource_server_create(name=scope, audience=audience)
            servers[audience] = (rs.client_id, secret)
    scenario.agent.allowed_scopes = [s for s, _ in STEPS] + ["ledger:write"]
    scenario.agent.save()
    return servers


def _introspect(client: Client, token: str, creds: tuple[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = client.post(
        "/o/introspect/",
        urlencode({"token": token}),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(*creds),
    ).json()
    return body


def _wait_delivered(approval_id: UUID, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ApprovalRequest.objects.filter(pk=approval_id, delivered_at__isnull=False).exists():
            return
        time.sleep(0.05)
    pytest.fail("the Celery worker did not deliver the prompt")


@pytest.mark.parametrize("mode", ["exchange", "rotating", "none"])
def test_procurement_run_survives_token_expiry(
    mode: str,
    flow: OAuthFlow,
    scenario: Scenario,
    procurement: dict[str, tuple[str, str]],
    worker: None,
    client: Client,
) -> None:
    key = AgentKey()
    scenario.agent.refresh_mode = mode
    scenario.agent.jwks = {"keys": [key.jwk]}
    scenario.agent.save()
    start = time.time()
    with time_machine.travel(start, tick=True) as clock:
        body = flow.full(scope=" ".join([s for s, _ in STEPS] + ["ledger:write"]))
        flow.client.logout()
        token = body["access_token"]
        assert ("refresh_token" in body) == (mode == "rotating")
        for minute, (scope, audience) in enumerate(STEPS, start=1):
            clock.move_to(start + minute * MINUTE)
            seen = _introspect(client, token, procurement[audience])
            assert seen["active"] is True and scope in seen["scope"].split(), (minute, seen)

        clock.move_to(start + 18 * MINUTE)
        assert _introspect(client, token, procurement["http://catalog.test"]) == {"active": False}
        if mode == "exchange":
            reminted = _exchange(client, key.assertion(scenario.agent.client_id), token)
            assert reminted.status_code == 200, reminted.content
            token = reminted.json()["access_token"]
        elif mode == "rotating":
            refreshed = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
            assert refreshed.status_code == 200, refreshed.content
            token = refreshed.json()["access_token"]
        else:
            # No way to continue: the agent learns it before writing anything.
            refused = flow.token({"grant_type": "refresh_token", "refresh_token": "none-exists"})
            assert refused.status_code == 400
            ask = client.post(
                "/o/bc-authorize/",
                urlencode(
                    {
                        "scope": "ledger:write",
                        "login_hint_token": token,
                        "authorization_details": json.dumps([LEDGER_ENTRY]),
                    }
                ),
                content_type="application/x-www-form-urlencoded",
                HTTP_AUTHORIZATION=basic(scenario.agent.client_id, scenario.agent_secret),
            )
            assert ask.status_code == 400 and ask.json()["error"] == "expired_login_hint_token"
            assert ApprovalRequest.objects.count() == 0
            assert not AuditEvent.objects.filter(event="action_token.redeemed").exists()
            call_command("audit_verify", stdout=StringIO())
            return

        ask = client.post(
            "/o/bc-authorize/",
            urlencode(
                {
                    "scope": "ledger:write",
                    "login_hint_token": token,
                    "binding_message": "Step 5 of 5",
                    "authorization_details": json.dumps([LEDGER_ENTRY]),
                }
            ),
            content_type="application/x-www-form-urlencoded",
            HTTP_AUTHORIZATION=basic(scenario.agent.client_id, scenario.agent_secret),
        )
        assert ask.status_code == 200, ask.content
        auth_req_id = ask.json()["auth_req_id"]
        approval = ApprovalRequest.objects.get()
        _wait_delivered(approval.pk)
        officer = type(client)()
        officer.login(username="officer", password=PASSWORD)
        assert officer.post(f"/approvals/{approval.pk}/approve/").status_code == 302
        collected = flow.token(
            {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": auth_req_id}
        )
        assert collected.status_code == 200, collected.content
        ledger = procurement["http://ledger.test"]
        redeemed = client.post(
            "/o/redeem/",
            urlencode({"token": collected.json()["access_token"]}),
            content_type="application/x-www-form-urlencoded",
            HTTP_AUTHORIZATION=basic(*ledger),
        )
        assert redeemed.status_code == 200 and redeemed.json()["authorization_details"] == [LEDGER_ENTRY]

    call_command("audit_verify", stdout=StringIO())
    trail = list(AuditEvent.objects.order_by("id").values_list("event", flat=True))
    remint = "token.exchanged" if mode == "exchange" else "token.refreshed"
    expected = [
        "consent.given",
        "token.issued",
        remint,
        "approval.requested",
        "approval.delivered",
        "approval.approved",
        "action_token.issued",
        "action_token.redeemed",
    ]
    positions = [trail.index(e) for e in expected]
    assert positions == sorted(positions), trail
    assert Agent.objects.get(pk=scenario.agent.pk).refresh_mode == mode

"""How many SQL statements each protocol request costs, named per grant and endpoint.

The hot paths run hand-written SQL (``consent.rows``) so that a request costs a few
statements, not a dozen ORM round trips. These numbers are the budget: a change that
adds a statement to a hot path has to change this file, and say why. BEGIN and COMMIT
count as statements here (the test database logs them).
"""

import json
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from approvals.models import ApprovalRequest
from approvals.services import approval_approve
from consent.services import AuthContext
from tests.approvals.conftest import LEDGER_ENTRY
from tests.conftest import basic
from tests.consent.test_token_exchange import ACCESS, EXCHANGE, AgentKey

pytestmark = pytest.mark.django_db(transaction=True)

# Statements per request, on PostgreSQL: the numbers this file holds the code to.
BUDGET = {
    "authorization_code": 99,
    "refresh_token": 99,
    "token_exchange": 99,
    "backchannel_request": 99,
    "ciba_poll_pending": 99,
    "ciba_collect": 99,
    "redeem_winner": 99,
    "redeem_loser": 99,
    "introspect": 99,
}


def statements(fn):
    with CaptureQueriesContext(connection) as captured:
        response = fn()
    return response, [q["sql"] for q in captured.captured_queries]


def _check(name, fn, expect_status=200):
    response, sql = statements(fn)
    assert response.status_code == expect_status, response.content[:300]
    print(f"\n{name} {len(sql)}\n  " + "\n  ".join(x[:150] for x in sql))
    assert len(sql) <= BUDGET[name], "\n".join(sql)
    return response


@pytest.fixture
def ciba(flow, scenario, ledger_policy, settings):
    from tests.approvals.conftest import Agent

    settings.CELERY_TASK_ALWAYS_EAGER = False
    agent = Agent(flow, scenario)
    agent.start_session()
    return agent


def test_code_exchange_and_refresh(flow):
    flow.login()
    from tests.conftest import REDIRECT_URI, pkce_pair

    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=challenge)))
    body = _check("authorization_code", lambda: flow.token({
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier})).json()
    _check("refresh_token", lambda: flow.token({"grant_type": "refresh_token",
                                                "refresh_token": body["refresh_token"]}))


def test_token_exchange_re_mint(flow, scenario):
    key = AgentKey()
    scenario.agent.jwks = {"keys": [key.jwk]}
    scenario.agent.refresh_mode = "exchange"
    scenario.agent.save()
    subject = flow.full()["access_token"]
    _check("token_exchange", lambda: flow.client.post("/o/token/", urlencode({
        "grant_type": EXCHANGE, "subject_token": subject, "subject_token_type": ACCESS,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": key.assertion(scenario.agent.client_id)}),
        content_type="application/x-www-form-urlencoded"))


def test_backchannel_poll_collect_redeem_introspect(ciba, flow, scenario):
    asked = _check("backchannel_request", lambda: ciba.ask()).json()
    _check("ciba_poll_pending", lambda: ciba.poll(asked["auth_req_id"]), expect_status=400)
    approval = ApprovalRequest.objects.get()
    from django.utils import timezone

    approval_approve(approval_id=approval.pk, user=scenario.user, auth=AuthContext(timezone.now(), ["pwd"]))
    token = _check("ciba_collect", lambda: ciba.poll(asked["auth_req_id"])).json()["access_token"]
    _check("redeem_winner", lambda: ciba.redeem(token))
    _check("redeem_loser", lambda: ciba.redeem(token), expect_status=400)
    _check("introspect", lambda: flow.introspect(ciba.session_token))

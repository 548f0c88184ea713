"""How many SQL statements each protocol request costs, named per grant and endpoint.

The hot paths run hand-written SQL (``consent.rows``), so a request costs a few statements
rather than a dozen ORM round trips. These numbers are the budget: a change that adds a
statement to a hot path changes this file and says why. Counted as the test database logs
them, so BEGIN, COMMIT and ROLLBACK are included; caches that live for a few seconds in a
server (signing key, scope audiences, a resource server's verified credentials) are warm,
as they are under load.
"""

from urllib.parse import urlencode

import pytest
from django.utils import timezone
from pytest_django import DjangoAssertNumQueries, Settings

from approvals.models import ApprovalRequest
from approvals.services import approval_approve
from approvals.wording import approve_gives
from consent.keys import active_signing_key, verification_key
from consent.models import ScopePolicy
from consent.services import AuthContext
from consent.tokens import audiences_for
from tests.approvals.conftest import Agent as CibaAgent
from tests.conftest import REDIRECT_URI, OAuthFlow, Scenario, pkce_pair
from tests.consent.test_token_exchange import ACCESS, EXCHANGE, AgentKey

# As in a server: each request its own transaction (a test transaction would turn them into savepoints).
pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = {
    # the code with its grant and agent; one statement consumes the code (holding the grant live) and
    # writes the access token, the refresh token and the audit row
    "authorization_code": 2,
    # the refresh token with its grant and agent; one statement revokes it (holding the grant live),
    # retires its access token and writes the access token, the refresh token and the audit row
    "refresh_token": 2,
    # the agent (private_key_jwt), the subject token's grant; one statement holds the grant live and
    # writes the access token and the audit row
    "token_exchange": 3,
    # hint token + grant + agent + scope policy, duplicate and fatigue checks; one statement writes the
    # request and its audit row
    "backchannel_request": 3,
    # the agent, the request with its grant and policy, the poll time
    "ciba_poll_pending": 3,
    # the agent, the request; one statement moves APPROVED -> ISSUED and writes the action token and
    # the audit row
    "ciba_collect": 3,
    # one statement: redeem, ISSUED -> REDEEMED, the audit row
    "redeem_winner": 1,
    # the same statement (it reads why it lost), the refusal's audit row
    "redeem_loser": 2,
    # the token with its grant and agent, and the resource server re-checked (verified from the cache)
    "introspect": 1,
}


@pytest.fixture(autouse=True)
def warm(scenario: Scenario) -> None:
    verification_key(active_signing_key().kid)
    audiences_for(["catalog:read", "budget:read"])


def test_code_exchange_and_refresh(
    flow: OAuthFlow, django_assert_max_num_queries: DjangoAssertNumQueries
) -> None:
    flow.login()
    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=challenge)))
    with django_assert_max_num_queries(BUDGET["authorization_code"]):
        response = flow.token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
            }
        )
    assert response.status_code == 200, response.content
    with django_assert_max_num_queries(BUDGET["refresh_token"]):
        response = flow.token(
            {"grant_type": "refresh_token", "refresh_token": response.json()["refresh_token"]}
        )
    assert response.status_code == 200, response.content


def test_token_exchange_re_mint(
    flow: OAuthFlow, scenario: Scenario, django_assert_max_num_queries: DjangoAssertNumQueries
) -> None:
    key = AgentKey()
    scenario.agent.jwks = {"keys": [key.jwk]}
    scenario.agent.refresh_mode = "exchange"
    scenario.agent.save()
    subject = flow.full()["access_token"]
    form = urlencode(
        {
            "grant_type": EXCHANGE,
            "subject_token": subject,
            "subject_token_type": ACCESS,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": key.assertion(scenario.agent.client_id),
        }
    )
    with django_assert_max_num_queries(BUDGET["token_exchange"]):
        response = flow.client.post("/o/token/", form, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200, response.content


def test_backchannel_poll_collect_redeem_introspect(
    flow: OAuthFlow,
    scenario: Scenario,
    ledger_policy: ScopePolicy,
    settings: Settings,
    django_assert_max_num_queries: DjangoAssertNumQueries,
) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False
    agent = CibaAgent(flow, scenario)
    agent.start_session()
    assert agent.session_token is not None
    # The prompt's sentence of what approving gives, which a running server holds for a minute
    # (approvals.wording); the request pushes the prompt itself.
    approve_gives("ledger:write")
    with django_assert_max_num_queries(BUDGET["backchannel_request"]):
        asked = agent.ask()
    assert asked.status_code == 200, asked.content
    auth_req_id = asked.json()["auth_req_id"]
    with django_assert_max_num_queries(BUDGET["ciba_poll_pending"]):
        pending = agent.poll(auth_req_id)
    assert pending.json()["error"] == "authorization_pending"
    approval_approve(
        approval_id=ApprovalRequest.objects.get().pk,
        user=scenario.user,
        auth=AuthContext(timezone.now(), ["pwd"]),
    )
    with django_assert_max_num_queries(BUDGET["ciba_collect"]):
        collected = agent.poll(auth_req_id)
    assert collected.status_code == 200, collected.content
    token = collected.json()["access_token"]
    flow.introspect(agent.session_token)  # verifies the resource server once, as a running server has
    agent.redeem(token[:-4] + "AAAA")  # a refused attempt: the ledger's credentials are now verified
    with django_assert_max_num_queries(BUDGET["redeem_winner"]):
        won = agent.redeem(token)
    assert won.status_code == 200, won.content
    with django_assert_max_num_queries(BUDGET["redeem_loser"]):
        lost = agent.redeem(token)
    assert lost.status_code == 400 and lost.json()["reason"] == "already_redeemed"
    with django_assert_max_num_queries(BUDGET["introspect"]):
        introspected = flow.introspect(agent.session_token)
    assert introspected.json()["active"] is True

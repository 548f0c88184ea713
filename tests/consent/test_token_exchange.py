"""RFC 8693 token exchange with private_key_jwt (RFC 7523): re-mint and delegation."""

import json
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import time_machine
from cryptography.hazmat.primitives.asymmetric import ec
from django.test import Client
from jwt.algorithms import ECAlgorithm

from audit.models import AuditEvent
from consent.models import AccessToken, Agent, SessionGrant
from consent.services import agent_create, grant_revoke
from tests.conftest import REDIRECT_URI, ClientResponse, OAuthFlow, Scenario

pytestmark = pytest.mark.django_db

ISSUER = "http://127.0.0.1:8000"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


class AgentKey:
    def __init__(self, kid: str = "k1") -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.kid = kid
        self.jwk = {**json.loads(ECAlgorithm.to_jwk(self.private.public_key())), "kid": kid, "alg": "ES256"}

    def assertion(self, client_id: str, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": f"{ISSUER}/o/token/",
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_urlsafe(16),
            **overrides,
        }
        return jwt.encode(claims, self.private, algorithm="ES256", headers={"kid": self.kid})


@pytest.fixture
def key(scenario: Scenario) -> AgentKey:
    k = AgentKey()
    scenario.agent.jwks = {"keys": [k.jwk]}
    scenario.agent.refresh_mode = Agent.RefreshMode.EXCHANGE
    scenario.agent.save()
    return k


def _exchange(client: Client, assertion: str, subject: str, **extra: str) -> ClientResponse:
    data = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        **extra,
    }
    return client.post("/o/token/", urlencode(data), content_type="application/x-www-form-urlencoded")


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def test_expired_session_token_is_re_minted_with_the_agents_key(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey
) -> None:
    body = flow.full()
    assert "refresh_token" not in body  # exchange mode: no refresh token exists
    old = body["access_token"]
    with time_machine.travel(time.time() + 18 * 60, tick=True):
        assert flow.introspect(old).json() == {"active": False}
        response = _exchange(flow.client, key.assertion(scenario.agent.client_id), old)
        assert response.status_code == 200, response.content
        new = response.json()
        assert new["issued_token_type"] == ACCESS and "refresh_token" not in new
        claims, before = _claims(new["access_token"]), _claims(old)
        for same in ("sub", "grant_id", "scope", "act", "client_id", "aud"):
            assert claims[same] == before[same]
        assert claims["exp"] > time.time() + 800
        assert flow.introspect(new["access_token"]).json()["active"] is True
    assert AuditEvent.objects.filter(event="token.exchanged").count() == 1


def test_exchange_narrows_but_never_widens(flow: OAuthFlow, scenario: Scenario, key: AgentKey) -> None:
    old = flow.full()["access_token"]
    narrowed = _exchange(flow.client, key.assertion(scenario.agent.client_id), old, scope="catalog:read")
    assert narrowed.json()["scope"] == "catalog:read"
    wider = _exchange(
        flow.client,
        key.assertion(scenario.agent.client_id),
        narrowed.json()["access_token"],
        scope="catalog:read budget:read",
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    step_up = _exchange(flow.client, key.assertion(scenario.agent.client_id), old, scope="ledger:write")
    assert step_up.status_code == 400 and step_up.json()["error"] == "invalid_scope"
    by_audience = _exchange(
        flow.client, key.assertion(scenario.agent.client_id), old, audience="http://budget.test"
    )
    assert by_audience.json()["scope"] == "budget:read"
    assert _claims(by_audience.json()["access_token"])["aud"] == ["http://budget.test"]


@pytest.mark.parametrize("problem", ["wrong_key", "wrong_aud", "long_exp", "replayed_jti", "other_client"])
def test_bad_client_assertions_are_invalid_client(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey, problem: str
) -> None:
    old = flow.full()["access_token"]
    cid = scenario.agent.client_id
    if problem == "wrong_key":
        assertion = AgentKey().assertion(cid)
    elif problem == "wrong_aud":
        assertion = key.assertion(cid, aud="https://other.example/token")
    elif problem == "long_exp":
        assertion = key.assertion(cid, exp=int(time.time()) + 3600)
    elif problem == "other_client":
        assertion = key.assertion("someone-else")
    else:
        assertion = key.assertion(cid, jti="fixed-jti-123456")
        assert _exchange(flow.client, assertion, old).status_code == 200
        assertion = key.assertion(cid, jti="fixed-jti-123456")
    tokens_before = AccessToken.objects.count()
    response = _exchange(flow.client, assertion, old)
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert AccessToken.objects.count() == tokens_before
    assert AuditEvent.objects.filter(event="token.refused", error="invalid_client").count() == 1


def test_client_secret_is_not_enough_to_exchange(flow: OAuthFlow, scenario: Scenario, key: AgentKey) -> None:
    old = flow.full()["access_token"]
    response = flow.token({"grant_type": EXCHANGE, "subject_token": old, "subject_token_type": ACCESS})
    assert response.status_code == 400 and response.json()["error"] == "unauthorized_client"


def test_subject_token_refusals(flow: OAuthFlow, scenario: Scenario, key: AgentKey) -> None:
    old = flow.full()["access_token"]
    cid = scenario.agent.client_id
    forged = jwt.encode(
        {**_claims(old), "scope": "catalog:read budget:read ledger:write"},
        AgentKey().private,
        algorithm="ES256",
        headers={"typ": "at+jwt", "kid": "x"},
    )
    assert _exchange(flow.client, key.assertion(cid), forged).json()["error"] == "invalid_grant"
    with time_machine.travel(time.time() + 900 + 3600 + 60, tick=True):
        too_old = _exchange(flow.client, key.assertion(cid), old)
        assert (
            too_old.json()["error"] == "invalid_grant"
            and "too long ago" in too_old.json()["error_description"]
        )
    other, other_secret = agent_create(
        name="Other", publisher="X", scopes=["catalog:read"], redirect_uris=[REDIRECT_URI]
    )
    other_key = AgentKey()
    other.jwks = {"keys": [other_key.jwk]}
    other.save()
    stolen = _exchange(flow.client, other_key.assertion(other.client_id), old)
    assert stolen.json()["error"] == "invalid_grant"
    grant_revoke(grant_id=_claims(old)["grant_id"], reason="revoked_by_user", actor="test")
    revoked = _exchange(flow.client, key.assertion(cid), old)
    assert revoked.status_code == 400 and revoked.json()["error"] == "invalid_grant"


def test_delegation_nests_the_actor_chain_only_for_permitted_sub_agents(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey
) -> None:
    sub, _ = agent_create(
        name="Catalog Helper", publisher="Acme", scopes=["catalog:read"], redirect_uris=[REDIRECT_URI]
    )
    sub_key = AgentKey("s1")
    sub.jwks = {"keys": [sub_key.jwk]}
    sub.save()
    scenario.agent.delegates = [sub.client_id]
    scenario.agent.save()
    old = flow.full()["access_token"]
    grant = SessionGrant.objects.get()
    assert grant.permitted_delegates == [sub.client_id]
    response = _exchange(
        flow.client,
        key.assertion(scenario.agent.client_id),
        old,
        actor_token=sub_key.assertion(sub.client_id),
        actor_token_type=JWT_TYPE,
    )
    assert response.status_code == 200, response.content
    claims = _claims(response.json()["access_token"])
    assert claims["act"] == {
        "sub": f"agent:{sub.client_id}",
        "act": {"sub": f"agent:{scenario.agent.client_id}"},
    }
    assert claims["client_id"] == sub.client_id and claims["scope"] == "catalog:read"
    assert claims["sub"] == f"user:{scenario.user.pk}"

    stranger, _ = agent_create(
        name="Stranger", publisher="Y", scopes=["catalog:read"], redirect_uris=[REDIRECT_URI]
    )
    stranger_key = AgentKey("z")
    stranger.jwks = {"keys": [stranger_key.jwk]}
    stranger.save()
    refused = _exchange(
        flow.client,
        key.assertion(scenario.agent.client_id),
        old,
        actor_token=stranger_key.assertion(stranger.client_id),
        actor_token_type=JWT_TYPE,
    )
    assert refused.status_code == 400 and refused.json()["error"] == "unauthorized_client"
    unregistered = _exchange(
        flow.client,
        key.assertion(scenario.agent.client_id),
        old,
        actor_token=AgentKey().assertion("ghost"),
        actor_token_type=JWT_TYPE,
    )
    assert unregistered.json()["error"] == "invalid_grant"


def test_private_key_jwt_works_at_the_code_exchange_too(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey
) -> None:
    from tests.conftest import pkce_pair

    flow.login()
    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=challenge)))
    response = flow.client.post(
        "/o/token/",
        urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": key.assertion(scenario.agent.client_id),
            }
        ),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200, response.content


@pytest.mark.parametrize("mode", ["rotating", "none"])
def test_re_mint_by_exchange_is_only_for_exchange_mode_agents(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey, mode: str
) -> None:
    scenario.agent.refresh_mode = mode
    scenario.agent.save()
    old = flow.full()["access_token"]
    response = _exchange(flow.client, key.assertion(scenario.agent.client_id), old)
    assert response.status_code == 400 and response.json()["error"] == "unauthorized_client"

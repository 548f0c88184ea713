"""DPoP at the token endpoint (RFC 9449), bound to the agent's registered keys; the agent registry."""

import json
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from django.test import Client

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.keys import jwk_thumbprint
from consent.models import AccessToken, ScopePolicy
from consent.oauth.dpop import ath_for, current_nonce
from consent.services import agent_update
from tests.approvals.conftest import LEDGER_ENTRY
from tests.conftest import PASSWORD, REDIRECT_URI, ClientResponse, OAuthFlow, Scenario, basic, pkce_pair
from tests.consent.test_token_exchange import AgentKey

pytestmark = pytest.mark.django_db
TOKEN_URL = "http://127.0.0.1:8000/o/token/"


def proof(
    key: AgentKey,
    *,
    htm: str = "POST",
    htu: str = TOKEN_URL,
    nonce: str | bool | None = None,  # False: no nonce claim at all
    iat: float | None = None,
    jti: str | None = None,
    token: str | None = None,
    typ: str = "dpop+jwt",
) -> str:
    claims: dict[str, Any] = {
        "htm": htm,
        "htu": htu,
        "iat": int(iat or time.time()),
        "jti": jti or secrets.token_urlsafe(12),
    }
    if nonce is not False:
        claims["nonce"] = nonce or current_nonce()
    if token:
        claims["ath"] = ath_for(token)
    public = {k: v for k, v in key.jwk.items() if k in ("kty", "crv", "x", "y")}
    return jwt.encode(claims, key.private, algorithm="ES256", headers={"typ": typ, "jwk": public})


@pytest.fixture
def key(scenario: Scenario) -> AgentKey:
    k = AgentKey()
    scenario.agent.jwks = {"keys": [k.jwk]}
    scenario.agent.save()
    return k


def _code(flow: OAuthFlow) -> tuple[str, str]:
    flow.login()
    verifier, challenge = pkce_pair()
    return flow.code_from(flow.consent(flow.authorize_query(challenge=challenge))), verifier


def _token(flow: OAuthFlow, data: dict[str, str], dpop: str | None = None) -> ClientResponse:
    extra: dict[str, Any] = {"HTTP_DPOP": dpop} if dpop else {}
    return flow.client.post(
        "/o/token/",
        urlencode(data),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(flow.s.agent.client_id, flow.s.agent_secret),
        **extra,
    )


def test_dpop_bound_session_token_carries_the_registered_key_thumbprint(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey
) -> None:
    code, verifier = _code(flow)
    response = _token(
        flow,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        proof(key),
    )
    assert response.status_code == 200, response.content
    assert response.json()["token_type"] == "DPoP" and response["DPoP-Nonce"]
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": jwk_thumbprint(key.jwk)}
    assert flow.introspect(response.json()["access_token"]).json()["cnf"] == {"jkt": jwk_thumbprint(key.jwk)}


@pytest.mark.parametrize(
    "problem",
    [
        "unregistered_key",
        "wrong_url",
        "wrong_method",
        "stale",
        "no_nonce",
        "replayed",
        "wrong_typ",
        "two_proofs",
    ],
)
def test_bad_proofs_are_refused_and_nothing_is_issued(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey, problem: str
) -> None:
    code, verifier = _code(flow)
    good = proof(key, jti="fixed-jti-0001")
    dpop = {
        "unregistered_key": proof(AgentKey()),
        "wrong_url": proof(key, htu="http://127.0.0.1:8000/o/other/"),
        "wrong_method": proof(key, htm="GET"),
        "stale": proof(key, iat=time.time() - 600),
        "no_nonce": proof(key, nonce=False),
        "replayed": good,
        "wrong_typ": proof(key, typ="JWT"),
        "two_proofs": f"{good},{good}",
    }[problem]
    if problem == "replayed":
        first = _token(
            flow,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
            },
            good,
        )
        assert first.status_code == 200
        code, verifier = _code(flow)
    before = AccessToken.objects.count()
    response = _token(
        flow,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        dpop,
    )
    assert response.status_code == 400
    expected = "use_dpop_nonce" if problem == "no_nonce" else "invalid_dpop_proof"
    assert response.json()["error"] == expected and response["DPoP-Nonce"]
    assert AccessToken.objects.count() == before
    assert AuditEvent.objects.filter(event="token.refused", error=expected).count() == 1


def test_agent_that_requires_dpop_gets_nothing_without_a_proof(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey
) -> None:
    agent_update(agent=scenario.agent, changes={"require_dpop": True})
    code, verifier = _code(flow)
    response = _token(
        flow,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_dpop_proof"
    ok = _token(
        flow,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        proof(key),
    )
    assert ok.status_code == 200 and ok.json()["token_type"] == "DPoP"


def test_action_token_collected_with_a_proof_is_bound_too(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey, ledger_policy: ScopePolicy, client: Client
) -> None:  # noqa: F811
    session = flow.full()["access_token"]
    ask = flow.client.post(
        "/o/bc-authorize/",
        urlencode(
            {
                "scope": "ledger:write",
                "login_hint_token": session,
                "authorization_details": json.dumps([LEDGER_ENTRY]),
            }
        ),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(scenario.agent.client_id, scenario.agent_secret),
    ).json()
    client.login(username="officer", password=PASSWORD)
    client.post(f"/approvals/{ApprovalRequest.objects.get().pk}/approve/")
    collected = _token(
        flow,
        {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": ask["auth_req_id"]},
        proof(key),
    )
    assert collected.status_code == 200 and collected.json()["token_type"] == "DPoP"
    claims = jwt.decode(collected.json()["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": jwk_thumbprint(key.jwk)}


def test_registry_shows_status_and_key_thumbprints_to_resource_servers(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey, client: Client
) -> None:
    url = f"/o/agents/{scenario.agent.client_id}"
    assert client.get(url).status_code == 401
    entry = client.get(url, HTTP_AUTHORIZATION=basic(scenario.rs_client_id, scenario.rs_secret)).json()
    assert entry["status"] == "active" and entry["jkt"] == [jwk_thumbprint(key.jwk)]
    assert entry["actor"] == f"agent:{scenario.agent.client_id}" and entry["publisher"] == "Acme Agents"
    agent_update(agent=scenario.agent, changes={"status": "suspended"})
    again = client.get(url, HTTP_AUTHORIZATION=basic(scenario.rs_client_id, scenario.rs_secret)).json()
    assert again["status"] == "suspended"
    assert (
        client.get(
            "/o/agents/nobody", HTTP_AUTHORIZATION=basic(scenario.rs_client_id, scenario.rs_secret)
        ).status_code
        == 404
    )
    document = client.get("/.well-known/agent-registry.jwt")
    assert jwt.get_unverified_header(document.content.decode())["typ"] == "agent-registry+jwt"
    kid = jwt.get_unverified_header(document.content.decode())["kid"]
    jwk = next(k for k in client.get("/.well-known/jwks.json").json()["keys"] if k["kid"] == kid)
    body = jwt.decode(document.content.decode(), jwt.PyJWK(jwk).key, algorithms=["ES256"])
    assert [a["status"] for a in body["agents"] if a["client_id"] == scenario.agent.client_id] == [
        "suspended"
    ]


def test_a_dpop_bound_session_never_turns_into_a_bearer_one(
    flow: OAuthFlow, scenario: Scenario, key: AgentKey
) -> None:
    scenario.agent.refresh_mode = "rotating"
    scenario.agent.save()
    code, verifier = _code(flow)
    first = _token(
        flow,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        proof(key),
    ).json()
    bearer = _token(flow, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert bearer.status_code == 400 and bearer.json()["error"] == "invalid_dpop_proof"
    bound = _token(flow, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}, proof(key))
    assert bound.status_code == 200 and bound.json()["token_type"] == "DPoP"

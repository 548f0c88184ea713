"""Every 401 carries a WWW-Authenticate challenge that agrees with the JSON body.

RFC 6749 §5.2: on ``invalid_client`` with HTTP 401 the server MUST include a
WWW-Authenticate header; RFC 6750 §3 / RFC 7235 §2.2 give the attribute syntax
(``realm``, ``error``, ``error_description``). Ours always names realm="countersign", and its
``error`` must be the same code the body reports, so a client reading either gets the same story.
"""

import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, TypedDict
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from django.test import Client
from jwt.algorithms import ECAlgorithm

from consent.conf import countersign_settings
from consent.models import Agent, ScopePolicy
from consent.services import agent_update
from tests.approvals.conftest import LEDGER_ENTRY
from tests.conftest import REDIRECT_URI, ClientResponse, OAuthFlow, Scenario, basic, pkce_pair

pytestmark = pytest.mark.django_db

FORM = "application/x-www-form-urlencoded"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CIBA = "urn:openid:params:grant-type:ciba"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"

# RFC 7235 §2.1 auth-param: token BWS "=" BWS ( token / quoted-string )
_PARAM = re.compile(
    r'([A-Za-z0-9_!#$%&\'*+.^`|~-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_!#$%&\'*+.^`|~-]+))'
)


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split one challenge into its scheme and auth-params."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme, params


class Key:
    """An EC key an agent could register for private_key_jwt."""

    def __init__(self, kid: str = "k1") -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.kid = kid
        self.jwk = {**json.loads(ECAlgorithm.to_jwk(self.private.public_key())), "kid": kid, "alg": "ES256"}

    def assertion(self, client_id: str, **overrides: Any) -> str:
        now = int(time.time())
        issuer = countersign_settings.ISSUER
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": f"{issuer}/o/token/",
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_urlsafe(16),
            **overrides,
        }
        return jwt.encode(claims, self.private, algorithm="ES256", headers={"kid": self.kid})


class World(TypedDict):
    key: Key
    tokens: dict[str, Any]
    auth_req_id: str


@pytest.fixture
def world(flow: OAuthFlow, scenario: Scenario, ledger_policy: ScopePolicy) -> World:  # noqa: F811
    """A live grant with a session token, a refresh token and an action token, plus a registered key."""
    key = Key()
    scenario.agent.jwks = {"keys": [key.jwk]}
    scenario.agent.save()
    tokens = flow.full()
    flow.client.logout()
    asked = flow.client.post(
        "/o/bc-authorize/",
        urlencode(
            {
                "scope": "ledger:write",
                "login_hint_token": tokens["access_token"],
                "authorization_details": json.dumps([LEDGER_ENTRY]),
            }
        ),
        content_type=FORM,
        HTTP_AUTHORIZATION=basic(scenario.agent.client_id, scenario.agent_secret),
    )
    assert asked.status_code == 200, asked.content
    return {"key": key, "tokens": tokens, "auth_req_id": asked.json()["auth_req_id"]}


def _post(client: Client, path: str, data: Mapping[str, Any], auth: str | None = None) -> ClientResponse:
    extra: dict[str, Any] = {"HTTP_AUTHORIZATION": auth} if auth is not None else {}
    return client.post(path, urlencode(data), content_type=FORM, **extra)


def _code(flow: OAuthFlow) -> tuple[str, str]:
    flow.login()
    verifier, c = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=c)))
    flow.client.logout()
    return code, verifier


def _bad_secret(s: Scenario) -> str:
    return basic(s.agent.client_id, s.agent_secret + "x")


# Each case: (flow, scenario, world) -> response. Every one must be a 401.
CASES: dict[str, Callable[[OAuthFlow, Scenario, World], ClientResponse]] = {
    # --- token endpoint, client secret -------------------------------------------------------------
    "token/refresh/wrong_secret": lambda f, s, w: _post(
        f.client,
        "/o/token/",
        {"grant_type": "refresh_token", "refresh_token": w["tokens"]["refresh_token"]},
        _bad_secret(s),
    ),
    "token/refresh/unknown_client": lambda f, s, w: _post(
        f.client,
        "/o/token/",
        {"grant_type": "refresh_token", "refresh_token": w["tokens"]["refresh_token"]},
        basic("no-such-client", "whatever"),
    ),
    "token/refresh/secret_in_body_wrong": lambda f, s, w: _post(
        f.client,
        "/o/token/",
        {
            "grant_type": "refresh_token",
            "refresh_token": w["tokens"]["refresh_token"],
            "client_id": s.agent.client_id,
            "client_secret": "nope",
        },
    ),
    "token/authorization_code/wrong_secret": lambda f, s, w: (
        lambda cv: _post(
            f.client,
            "/o/token/",
            {
                "grant_type": "authorization_code",
                "code": cv[0],
                "redirect_uri": REDIRECT_URI,
                "code_verifier": cv[1],
            },
            _bad_secret(s),
        )
    )(_code(f)),
    "token/ciba_poll/wrong_secret": lambda f, s, w: _post(
        f.client, "/o/token/", {"grant_type": CIBA, "auth_req_id": w["auth_req_id"]}, _bad_secret(s)
    ),
    # --- token endpoint, private_key_jwt -----------------------------------------------------------
    "token/refresh/pkjwt_wrong_key": lambda f, s, w: _post(
        f.client,
        "/o/token/",
        {
            "grant_type": "refresh_token",
            "refresh_token": w["tokens"]["refresh_token"],
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": Key().assertion(s.agent.client_id),
        },
    ),
    "token/refresh/pkjwt_wrong_audience": lambda f, s, w: _post(
        f.client,
        "/o/token/",
        {
            "grant_type": "refresh_token",
            "refresh_token": w["tokens"]["refresh_token"],
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": w["key"].assertion(s.agent.client_id, aud="https://elsewhere.example/"),
        },
    ),
    "token/refresh/pkjwt_wrong_assertion_type": lambda f, s, w: _post(
        f.client,
        "/o/token/",
        {
            "grant_type": "refresh_token",
            "refresh_token": w["tokens"]["refresh_token"],
            "client_assertion_type": "urn:example:not-jwt-bearer",
            "client_assertion": w["key"].assertion(s.agent.client_id),
        },
    ),
    "token/exchange/pkjwt_wrong_key": lambda f, s, w: _post(
        f.client,
        "/o/token/",
        {
            "grant_type": EXCHANGE,
            "subject_token": w["tokens"]["access_token"],
            "subject_token_type": ACCESS,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": Key().assertion(s.agent.client_id),
        },
    ),
    "token/suspended_agent": lambda f, s, w: (
        agent_update(agent=s.agent, changes={"status": Agent.Status.SUSPENDED}),
        _post(
            f.client,
            "/o/token/",
            {"grant_type": "refresh_token", "refresh_token": w["tokens"]["refresh_token"]},
            basic(s.agent.client_id, s.agent_secret),
        ),
    )[1],
    # --- introspection (resource-server authentication) --------------------------------------------
    "introspect/no_credentials": lambda f, s, w: _post(
        f.client, "/o/introspect/", {"token": w["tokens"]["access_token"]}
    ),
    "introspect/wrong_secret": lambda f, s, w: _post(
        f.client, "/o/introspect/", {"token": w["tokens"]["access_token"]}, basic(s.rs_client_id, "nope")
    ),
    "introspect/agent_credentials": lambda f, s, w: _post(
        f.client,
        "/o/introspect/",
        {"token": w["tokens"]["access_token"]},
        basic(s.agent.client_id, s.agent_secret),
    ),
    "introspect/malformed_basic": lambda f, s, w: _post(
        f.client, "/o/introspect/", {"token": w["tokens"]["access_token"]}, "Basic !!!not-base64"
    ),
    # --- redemption ---------------------------------------------------------------------------------
    "redeem/no_credentials": lambda f, s, w: _post(f.client, "/o/redeem/", {"token": "x.y.z"}),
    "redeem/wrong_secret": lambda f, s, w: _post(
        f.client, "/o/redeem/", {"token": "x.y.z"}, basic(s.ledger_client_id, "nope")
    ),
    # --- CIBA backchannel authentication endpoint ---------------------------------------------------
    "bc-authorize/no_credentials": lambda f, s, w: _post(
        f.client,
        "/o/bc-authorize/",
        {
            "scope": "ledger:write",
            "login_hint_token": w["tokens"]["access_token"],
            "authorization_details": json.dumps([LEDGER_ENTRY]),
        },
    ),
    "bc-authorize/wrong_secret": lambda f, s, w: _post(
        f.client,
        "/o/bc-authorize/",
        {
            "scope": "ledger:write",
            "login_hint_token": w["tokens"]["access_token"],
            "authorization_details": json.dumps([LEDGER_ENTRY]),
        },
        _bad_secret(s),
    ),
    "bc-authorize/pkjwt_wrong_key": lambda f, s, w: _post(
        f.client,
        "/o/bc-authorize/",
        {
            "scope": "ledger:write",
            "login_hint_token": w["tokens"]["access_token"],
            "authorization_details": json.dumps([LEDGER_ENTRY]),
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": Key().assertion(s.agent.client_id),
        },
    ),
    # --- RFC 7009 revocation -------------------------------------------------------------------------
    "revoke/no_credentials": lambda f, s, w: _post(
        f.client, "/o/revoke/", {"token": w["tokens"]["access_token"]}
    ),
    "revoke/wrong_secret": lambda f, s, w: _post(
        f.client, "/o/revoke/", {"token": w["tokens"]["access_token"]}, _bad_secret(s)
    ),
    "revoke/unknown_client": lambda f, s, w: _post(
        f.client,
        "/o/revoke/",
        {"token": w["tokens"]["refresh_token"], "token_type_hint": "refresh_token"},
        basic("no-such-client", "whatever"),
    ),
    "revoke/pkjwt_wrong_key": lambda f, s, w: _post(
        f.client,
        "/o/revoke/",
        {
            "token": w["tokens"]["access_token"],
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": Key().assertion(s.agent.client_id),
        },
    ),
    # --- agent registry for resource servers ---------------------------------------------------------
    "registry/no_credentials": lambda f, s, w: f.client.get(f"/o/agents/{s.agent.client_id}"),
    "registry/wrong_secret": lambda f, s, w: f.client.get(
        f"/o/agents/{s.agent.client_id}", HTTP_AUTHORIZATION=basic(s.rs_client_id, "nope")
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_401_names_the_same_error_in_its_challenge(
    flow: OAuthFlow, scenario: Scenario, world: World, case: str
) -> None:
    response = CASES[case](flow, scenario, world)
    assert response.status_code == 401, (response.status_code, response.content)
    body = json.loads(response.content)
    assert isinstance(body.get("error"), str) and body["error"], body
    assert response.has_header("WWW-Authenticate"), f"{case}: 401 without WWW-Authenticate ({body})"
    header = response["WWW-Authenticate"]
    scheme, params = challenge(header)
    assert scheme.lower() in ("basic", "bearer", "dpop"), header
    assert params.get("realm") == "countersign", header
    assert params.get("error") == body["error"], (header, body)
    if "error_description" in params and "error_description" in body:
        assert params["error_description"] == body["error_description"].replace('"', "'"), (header, body)

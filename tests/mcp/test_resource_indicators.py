"""RFC 8707 resource indicators: the token's aud is exactly the resources asked for, with the scopes they
serve; a resource outside the grant is invalid_target, changes nothing and leaves one audit row."""

from typing import Any

import jwt
import pytest

from consent.models import AccessToken, AuthorizationCode
from tests.conftest import REDIRECT_URI, ClientResponse, OAuthFlow, pkce_pair
from tests.consent.test_bad_input import Watch, _assert_error_redirect, _json_error

pytestmark = pytest.mark.django_db


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _code(
    flow: OAuthFlow, *, resource: str | None = None, scope: str = "catalog:read budget:read ledger:write"
) -> tuple[str, str]:
    flow.login()
    verifier, challenge = pkce_pair()
    extra = {"resource": resource} if resource else {}
    code = flow.code_from(flow.consent(flow.authorize_query(scope=scope, challenge=challenge, **extra)))
    return code, verifier


def _exchange(flow: OAuthFlow, code: str, verifier: str, *resources: str) -> ClientResponse:
    body = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT_URI),
        ("code_verifier", verifier),
        *[("resource", r) for r in resources],
    ]
    from urllib.parse import urlencode

    from tests.conftest import basic

    return flow.client.post(
        "/o/token/",
        urlencode(body),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(flow.s.agent.client_id, flow.s.agent_secret),
    )


def test_resource_at_the_token_endpoint_narrows_aud_and_scope(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    response = _exchange(flow, code, verifier, "http://catalog.test")
    assert response.status_code == 200, response.content
    body = response.json()
    claims = _claims(body["access_token"])
    assert claims["aud"] == ["http://catalog.test"]
    assert claims["scope"] == body["scope"] == "catalog:read"
    assert AccessToken.objects.get(jti=claims["jti"]).resource == ["http://catalog.test"]


def test_resource_given_twice_names_both(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    response = _exchange(flow, code, verifier, "http://catalog.test", "http://budget.test")
    assert response.status_code == 200, response.content
    claims = _claims(response.json()["access_token"])
    assert sorted(claims["aud"]) == ["http://budget.test", "http://catalog.test"]
    assert set(claims["scope"].split()) == {"catalog:read", "budget:read"}


def test_resource_at_authorize_is_kept_with_the_code(flow: OAuthFlow) -> None:
    code, verifier = _code(flow, resource="http://budget.test")
    assert AuthorizationCode.objects.get(code=code).resource == ["http://budget.test"]
    response = _exchange(flow, code, verifier)
    claims = _claims(response.json()["access_token"])
    assert claims["aud"] == ["http://budget.test"] and claims["scope"] == "budget:read"


def test_refresh_keeps_the_resource_and_refuses_another(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    body = _exchange(flow, code, verifier, "http://catalog.test").json()
    refreshed = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.content
    assert _claims(refreshed.json()["access_token"])["aud"] == ["http://catalog.test"]
    watch = Watch()
    response = flow.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": refreshed.json()["refresh_token"],
            "resource": "http://budget.test",
        }
    )
    _json_error(response, 400, "invalid_target")
    watch.assert_one_refusal(error="invalid_target", event="token.refused")
    watch.assert_nothing_changed()


@pytest.mark.parametrize(
    "resource",
    ["http://elsewhere.test", "http://ledger.test/../catalog", "not-a-uri", "http://catalog.test#frag"],
)
def test_resource_outside_the_grant_at_the_token_endpoint_is_invalid_target(
    flow: OAuthFlow, resource: str
) -> None:
    code, verifier = _code(flow, scope="catalog:read")
    watch = Watch()
    response = _exchange(flow, code, verifier, resource)
    _json_error(response, 400, "invalid_target")
    watch.assert_one_refusal(error="invalid_target", event="token.refused")
    watch.assert_nothing_changed()
    assert AuthorizationCode.objects.get(code=code).consumed_at is None


def test_resource_no_requested_scope_serves_is_refused_at_authorize(flow: OAuthFlow) -> None:
    flow.login()
    _, challenge = pkce_pair()
    watch = Watch()
    response = flow.client.get(
        "/o/authorize/?"
        + flow.authorize_query(scope="catalog:read", challenge=challenge, resource="http://budget.test")
    )
    _assert_error_redirect(response, "invalid_target")
    watch.assert_one_refusal(error="invalid_target", event="consent.request_refused")
    watch.assert_nothing_changed()


def test_a_token_request_cannot_widen_the_resource_of_the_authorization_request(flow: OAuthFlow) -> None:
    code, verifier = _code(flow, resource="http://budget.test")
    watch = Watch()
    response = _exchange(flow, code, verifier, "http://catalog.test")
    _json_error(response, 400, "invalid_target")
    watch.assert_one_refusal(error="invalid_target", event="token.refused")
    watch.assert_nothing_changed()

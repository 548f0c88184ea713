"""The session grant: consent, code exchange, the JWT access token, refresh rotation."""

import jwt
import pytest
from django.test import Client

from audit.models import AuditEvent
from consent.models import SessionGrant
from tests.conftest import REDIRECT_URI, OAuthFlow, Scenario, pkce_pair

pytestmark = pytest.mark.django_db


def _jwks_key(client: Client, token: str) -> jwt.PyJWK:
    kid = jwt.get_unverified_header(token)["kid"]
    keys = {k["kid"]: k for k in client.get("/.well-known/jwks.json").json()["keys"]}
    return jwt.PyJWK(keys[kid])


def test_consent_screen_shows_two_groups_and_agent_identity(flow: OAuthFlow) -> None:
    flow.login()
    _, challenge = pkce_pair()
    page = flow.client.get("/o/authorize/?" + flow.authorize_query(challenge=challenge)).content.decode()
    allowed = page.split("Allowed for this session")[1].split("Will ask you each time")[0]
    ask = page.split("Will ask you each time")[1]
    assert "catalog:read" in allowed and "budget:read" in allowed and "ledger:write" not in allowed
    assert "ledger:write" in ask
    assert "Procurement Agent" in page and "Acme Agents" in page
    assert ">Allow</button>" in page and ">Deny</button>" in page


def test_code_exchange_returns_session_token_naming_user_and_agent(
    flow: OAuthFlow, scenario: Scenario, client: Client
) -> None:
    body = flow.full()
    token = body["access_token"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = jwt.decode(
        token,
        _jwks_key(client, token),
        algorithms=["ES256"],
        audience="http://catalog.test",
        issuer="http://127.0.0.1:8000",
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    assert claims["sub"] == f"user:{scenario.user.pk}"
    assert claims["act"] == {"sub": f"agent:{scenario.agent.client_id}"}
    assert claims["client_id"] == scenario.agent.client_id
    assert claims["scope"] == "catalog:read budget:read"  # step-up scope never on the session token
    assert body["scope"] == "catalog:read budget:read"
    assert sorted(claims["aud"]) == ["http://budget.test", "http://catalog.test"]
    assert claims["exp"] - claims["iat"] == 900
    assert claims["amr"] == ["pwd"] and "auth_time" in claims
    grant = SessionGrant.objects.get(pk=claims["grant_id"])
    assert grant.step_up_scopes == ["ledger:write"] and grant.standard_scopes == [
        "catalog:read",
        "budget:read",
    ]
    assert grant.consent_shown["will_ask_each_time"][0]["scope"] == "ledger:write"
    assert "refresh_token" in body
    events = list(AuditEvent.objects.order_by("id").values_list("event", flat=True))
    assert "consent.given" in events and "token.issued" in events


def test_deny_redirects_with_access_denied_and_creates_nothing(flow: OAuthFlow) -> None:
    flow.login()
    _, challenge = pkce_pair()
    response = flow.consent(flow.authorize_query(challenge=challenge), decision="deny")
    assert response.status_code == 302 and "error=access_denied" in response["Location"]
    assert response["Location"].startswith(REDIRECT_URI)
    assert SessionGrant.objects.count() == 0
    assert AuditEvent.objects.filter(event="consent.refused", outcome="refused").count() == 1


def test_refresh_rotates_and_reuse_revokes_the_whole_grant(flow: OAuthFlow) -> None:
    first = flow.full()
    second = flow.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert second.status_code == 200, second.content
    second = second.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert flow.introspect(second["access_token"]).json()["active"] is True

    replay = flow.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    grant = SessionGrant.objects.get()
    assert grant.status == SessionGrant.Status.REVOKED and grant.end_reason == "refresh_token_reused"
    assert flow.introspect(second["access_token"]).json() == {"active": False}
    after = flow.token({"grant_type": "refresh_token", "refresh_token": second["refresh_token"]})
    assert after.status_code == 400
    assert AuditEvent.objects.filter(event="refresh_token.reuse_detected").count() == 1


def test_no_refresh_token_unless_agent_mode_is_rotating(flow: OAuthFlow, scenario: Scenario) -> None:
    scenario.agent.refresh_mode = "exchange"
    scenario.agent.save()
    assert "refresh_token" not in flow.full()


def test_introspection_reports_both_principals(flow: OAuthFlow, scenario: Scenario) -> None:
    token = flow.full()["access_token"]
    body = flow.introspect(token).json()
    assert body["active"] is True
    assert body["sub"] == f"user:{scenario.user.pk}"
    assert body["act"] == {"sub": f"agent:{scenario.agent.client_id}"}
    assert body["client_id"] == scenario.agent.client_id and body["scope"] == "catalog:read budget:read"
    assert "grant_id" in body and "exp" in body

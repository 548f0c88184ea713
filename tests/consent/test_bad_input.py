"""Bad input at every protocol endpoint (SECURITY.md).

Every refusal must be a clear protocol error (right status, right ``error``),
must change nothing, and must leave exactly one audit row with outcome
"refused". Each test snapshots the rows a refusal could create and the audit
chain head before the bad request, and checks both afterwards.
"""

from collections.abc import Callable
from datetime import timedelta
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from django.contrib.auth import get_user_model
from django.db.models import Max
from django.test import Client

from audit.models import AuditEvent
from consent.grants import authorization_code, refresh
from consent.models import AccessToken, Agent, AuthorizationCode, RefreshToken, SessionGrant
from consent.services import agent_create, agent_update, scope_set
from tests.conftest import PASSWORD, REDIRECT_URI, ClientResponse, OAuthFlow, Scenario, basic, pkce_pair

pytestmark = pytest.mark.django_db

ERROR_PAGE = "This request cannot continue"


# --- helpers --------------------------------------------------------------------------------------


def _head() -> int:
    return AuditEvent.objects.aggregate(m=Max("id"))["m"] or 0


def _row_counts() -> dict[str, int]:
    return {
        "grants": SessionGrant.objects.count(),
        "active_grants": SessionGrant.objects.filter(status=SessionGrant.Status.ACTIVE).count(),
        "codes": AuthorizationCode.objects.count(),
        "access_tokens": AccessToken.objects.count(),
        "refresh_tokens": RefreshToken.objects.count(),
    }


class Watch:
    """What a request changed: rows created and audit events appended."""

    def __init__(self) -> None:
        self.seq = _head()
        self.counts = _row_counts()

    def new_events(self) -> list[AuditEvent]:
        return list(AuditEvent.objects.filter(id__gt=self.seq).order_by("id"))

    def refused(self) -> list[AuditEvent]:
        return [e for e in self.new_events() if e.outcome == AuditEvent.Outcome.REFUSED]

    def assert_one_refusal(self, *, error: str, event: str | None = None) -> AuditEvent:
        refused = self.refused()
        assert len(refused) == 1, [(e.event, e.error, e.detail) for e in refused]
        row = refused[0]
        assert row.error == error, (row.event, row.error, row.detail)
        if event is not None:
            assert row.event == event
        return row

    def assert_nothing_changed(self, **expected_changes: int) -> None:
        now = _row_counts()
        expected = {k: v + expected_changes.get(k, 0) for k, v in self.counts.items()}
        assert now == expected


def _location_params(response: ClientResponse) -> dict[str, list[str]]:
    return parse_qs(urlparse(response["Location"]).query)


def _assert_error_redirect(response: ClientResponse, error: str) -> None:
    """A redirect back to the agent's registered redirect URI with ``error`` and the state."""
    assert response.status_code == 302, response.content[:300]
    location = response["Location"]
    assert location.startswith(REDIRECT_URI + "?"), location
    params = _location_params(response)
    assert params["error"] == [error], params
    assert params.get("state") == ["st-123"]
    assert "code" not in params


def _assert_error_page(response: ClientResponse, status: int = 400) -> None:
    """A fatal error: an HTML page, never a redirect anywhere."""
    assert response.status_code == status, response.status_code
    assert not response.has_header("Location")
    assert response["Content-Type"].startswith("text/html")
    assert ERROR_PAGE in response.content.decode()


# The stable name of each refusal (the body's "reason"); by default a refusal answers with its error.
REASON_OF = {"invalid_client": "client_authentication_failed"}


def _json_error(response: ClientResponse, status: int, error: str, reason: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error, body
    assert body["reason"] == (reason or REASON_OF.get(error, error)), body
    assert "no-store" in response.get("Cache-Control", "")


def _code(flow: OAuthFlow, *, scope: str = "catalog:read budget:read ledger:write") -> tuple[str, str]:
    """Log in, consent, return (code, verifier)."""
    flow.login()
    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(scope=scope, challenge=challenge)))
    return code, verifier


def _exchange(flow: OAuthFlow, code: str, verifier: str, **kw: Any) -> ClientResponse:
    return flow.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        **kw,
    )


def _revoke(
    client: Client, token: str, client_id: str, secret: str, hint: str | None = None
) -> ClientResponse:
    data = {"token": token}
    if hint:
        data["token_type_hint"] = hint
    return client.post(
        "/o/revoke/",
        urlencode(data),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(client_id, secret),
    )


@pytest.fixture
def other_agent(scenario: Scenario) -> tuple[Agent, str]:
    """A second, legitimate agent with its own credentials and the same redirect URI."""
    agent, secret = agent_create(
        name="Other Agent", publisher="Elsewhere Inc", scopes=["catalog:read"], redirect_uris=[REDIRECT_URI]
    )
    return agent, secret


# --- token endpoint: client authentication --------------------------------------------------------


def test_unknown_client_at_token_endpoint_is_invalid_client(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    w = Watch()
    response = _exchange(flow, code, verifier, auth=("no-such-client", "whatever"))
    _json_error(response, 401, "invalid_client")
    assert response.has_header("WWW-Authenticate")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client", event="token.refused")
    # the code was not burnt by the bad request: the real agent can still exchange it
    assert _exchange(flow, code, verifier).status_code == 200


def test_wrong_secret_is_invalid_client(flow: OAuthFlow, scenario: Scenario) -> None:
    code, verifier = _code(flow)
    w = Watch()
    response = _exchange(flow, code, verifier, auth=(scenario.agent.client_id, scenario.agent_secret + "x"))
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    row = w.assert_one_refusal(error="invalid_client", event="token.refused")
    assert row.client_id == scenario.agent.client_id
    assert scenario.agent_secret not in str(row.detail)


def test_no_client_authentication_at_all_is_invalid_client(flow: OAuthFlow, scenario: Scenario) -> None:
    code, verifier = _code(flow)
    w = Watch()
    response = flow.client.post(
        "/o/token/",
        urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                "client_id": scenario.agent.client_id,
            }
        ),
        content_type="application/x-www-form-urlencoded",
    )
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")


def test_malformed_basic_header_is_invalid_client(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    w = Watch()
    response = flow.client.post(
        "/o/token/",
        urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
            }
        ),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION="Basic %%%not-base64%%%",
    )
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")


def test_suspended_agent_cannot_exchange_a_code_it_already_holds(flow: OAuthFlow, scenario: Scenario) -> None:
    code, verifier = _code(flow)
    agent_update(agent=scenario.agent, changes={"status": Agent.Status.SUSPENDED})
    w = Watch()
    response = _exchange(flow, code, verifier)
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client", event="token.refused")


def test_suspended_agent_cannot_refresh(flow: OAuthFlow, scenario: Scenario) -> None:
    body = flow.full()
    agent_update(agent=scenario.agent, changes={"status": Agent.Status.SUSPENDED})
    w = Watch()
    response = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client", event="token.refused")
    assert flow.introspect(body["access_token"]).json() == {"active": False}


def test_agent_suspended_behind_the_services_back_still_gets_nothing(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    """Even if only the status column changes (no grant revocation ran), tokens stop working."""
    body = flow.full()
    Agent.objects.filter(pk=scenario.agent.pk).update(status=Agent.Status.SUSPENDED)
    assert flow.introspect(body["access_token"]).json() == {"active": False}
    w = Watch()
    response = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_suspended_agent_at_authorize_gets_an_error_page_not_a_redirect(
    flow: OAuthFlow, scenario: Scenario, method: str
) -> None:
    agent_update(agent=scenario.agent, changes={"status": Agent.Status.SUSPENDED})
    flow.login()
    _, challenge = pkce_pair()
    query = flow.authorize_query(challenge=challenge)
    w = Watch()
    if method == "GET":
        response = flow.client.get("/o/authorize/?" + query)
    else:
        response = flow.consent(query)
    _assert_error_page(response)
    assert "Allow</button>" not in response.content.decode()
    w.assert_nothing_changed()
    refused = w.refused()
    assert len(refused) == 1 and refused[0].event == "consent.request_refused"
    assert refused[0].client_id == scenario.agent.client_id


# --- authorization endpoint -----------------------------------------------------------------------

BAD_REDIRECTS = [
    "https://evil.example/callback",
    "http://127.0.0.1:8199/callback/extra",
    "http://127.0.0.1:8199/callbackx",
    "http://127.0.0.1:8199/callback?inject=1",
    "http://127.0.0.1:8199/callback#frag",
    "http://evil@127.0.0.1:8199/callback",
    "https://127.0.0.1:8199/callback",
    "http://localhost:8199/callback",
    "javascript:alert(1)",
]


@pytest.mark.parametrize("redirect_uri", BAD_REDIRECTS)
def test_bad_redirect_uri_gets_an_error_page_never_a_redirect(flow: OAuthFlow, redirect_uri: str) -> None:
    flow.login()
    _, challenge = pkce_pair()
    w = Watch()
    response = flow.client.get(
        "/o/authorize/?" + flow.authorize_query(challenge=challenge, redirect_uri=redirect_uri)
    )
    _assert_error_page(response, 400)
    assert "Allow</button>" not in response.content.decode()
    w.assert_nothing_changed()
    assert len(w.refused()) == 1 and w.refused()[0].event == "consent.request_refused"


def test_bad_redirect_uri_in_a_forged_consent_post_creates_nothing(flow: OAuthFlow) -> None:
    """A POST straight to the consent form with a foreign redirect_uri never mints a code."""
    flow.login()
    _, challenge = pkce_pair()
    w = Watch()
    response = flow.consent(flow.authorize_query(challenge=challenge, redirect_uri="https://evil.example/cb"))
    _assert_error_page(response, 400)
    w.assert_nothing_changed()
    assert len(w.refused()) == 1


def test_unknown_client_at_authorize_gets_an_error_page_not_its_redirect(flow: OAuthFlow) -> None:
    flow.login()
    _, challenge = pkce_pair()
    w = Watch()
    response = flow.client.get(
        "/o/authorize/?"
        + flow.authorize_query(
            challenge=challenge, client_id="no-such-client", redirect_uri="https://evil.example/cb"
        )
    )
    _assert_error_page(response, 400)
    w.assert_nothing_changed()
    assert len(w.refused()) == 1


def test_missing_pkce_challenge_redirects_with_invalid_request(flow: OAuthFlow) -> None:
    flow.login()
    w = Watch()
    response = flow.client.get("/o/authorize/?" + flow.authorize_query(challenge=None))
    _assert_error_redirect(response, "invalid_request")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_request", event="consent.request_refused")


def test_missing_pkce_challenge_in_consent_post_creates_no_grant(flow: OAuthFlow) -> None:
    flow.login()
    w = Watch()
    response = flow.consent(flow.authorize_query(challenge=None))
    _assert_error_redirect(response, "invalid_request")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_request")


@pytest.mark.parametrize("method", ["plain", None, "S512", "s256"])
def test_pkce_method_other_than_s256_is_refused(flow: OAuthFlow, method: str | None) -> None:
    """``plain`` (and a missing method, which RFC 7636 §4.3 defaults to plain) is refused."""
    flow.login()
    _, challenge = pkce_pair()
    query = flow.authorize_query(challenge=challenge, method=None)
    if method is not None:
        query += "&" + urlencode({"code_challenge_method": method})
    w = Watch()
    response = flow.client.get("/o/authorize/?" + query)
    _assert_error_redirect(response, "invalid_request")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_request")
    # and the consent form cannot be used to slip it through
    w = Watch()
    _assert_error_redirect(flow.consent(query), "invalid_request")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_request")


def test_plain_pkce_verifier_equal_to_challenge_never_yields_a_token(flow: OAuthFlow) -> None:
    """Even with S256 at authorize, sending the challenge itself as verifier (a plain downgrade) fails."""
    flow.login()
    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=challenge)))
    w = Watch()
    response = _exchange(flow, code, challenge)
    _json_error(response, 400, "invalid_grant", reason="pkce_mismatch")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


def test_wrong_code_verifier_is_invalid_grant(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    w = Watch()
    other_verifier, _ = pkce_pair()
    response = _exchange(flow, code, other_verifier)
    _json_error(response, 400, "invalid_grant", reason="pkce_mismatch")
    w.assert_nothing_changed()
    row = w.assert_one_refusal(error="invalid_grant", event="token.refused")
    assert verifier not in str(row.detail) and code not in str(row.detail)


def test_missing_code_verifier_is_refused(flow: OAuthFlow) -> None:
    code, _ = _code(flow)
    w = Watch()
    response = flow.token({"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI})
    assert response.status_code == 400
    assert response.json()["error"] in ("invalid_request", "invalid_grant")
    w.assert_nothing_changed()
    assert len(w.refused()) == 1


def test_reused_authorization_code_is_invalid_grant_and_revokes_the_grant(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    first = _exchange(flow, code, verifier)
    assert first.status_code == 200
    first = first.json()
    assert flow.introspect(first["access_token"]).json()["active"] is True

    w = Watch()
    replay = _exchange(flow, code, verifier)
    _json_error(replay, 400, "invalid_grant", reason="code_reused")
    w.assert_nothing_changed(active_grants=-1)
    w.assert_one_refusal(error="invalid_grant", event="token.refused")
    grant = SessionGrant.objects.get()
    assert grant.status == SessionGrant.Status.REVOKED
    assert grant.end_reason == "authorization_code_reused"
    # everything issued from the code is dead
    assert flow.introspect(first["access_token"]).json() == {"active": False}
    refresh = flow.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    _json_error(refresh, 400, "invalid_grant", reason="grant_inactive")


def test_code_presented_by_another_agent_is_invalid_grant_and_harms_nobody(
    flow: OAuthFlow, other_agent: tuple[Agent, str]
) -> None:
    agent, secret = other_agent
    code, verifier = _code(flow)
    w = Watch()
    response = _exchange(flow, code, verifier, auth=(agent.client_id, secret))
    _json_error(response, 400, "invalid_grant", reason="unknown_grant")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")
    # the thief cannot burn the victim's grant; the rightful agent still exchanges the code
    assert SessionGrant.objects.get().status == SessionGrant.Status.ACTIVE
    assert _exchange(flow, code, verifier).status_code == 200


def test_unknown_code_is_invalid_grant(flow: OAuthFlow) -> None:
    flow.login()
    w = Watch()
    response = _exchange(flow, "not-a-code", "x" * 43)
    _json_error(response, 400, "invalid_grant", reason="unknown_grant")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


def test_expired_code_is_invalid_grant(flow: OAuthFlow) -> None:
    code, verifier = _code(flow)
    from django.utils import timezone

    AuthorizationCode.objects.update(expires=timezone.now() - timedelta(seconds=1))
    w = Watch()
    response = _exchange(flow, code, verifier)
    _json_error(response, 400, "invalid_grant", reason="code_expired")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


def test_code_for_a_grant_revoked_before_exchange_is_invalid_grant(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    code, verifier = _code(flow)
    grant = SessionGrant.objects.get()
    flow.client.post(f"/grants/{grant.pk}/revoke/")
    assert SessionGrant.objects.get().status == SessionGrant.Status.REVOKED
    w = Watch()
    response = _exchange(flow, code, verifier)
    _json_error(response, 400, "invalid_grant", reason="grant_inactive")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


def test_code_exchanged_with_a_different_redirect_uri_is_invalid_grant(flow: OAuthFlow) -> None:
    """RFC 6749 §5.2: a redirect_uri that does not match the authorization request is invalid_grant."""
    code, verifier = _code(flow)
    w = Watch()
    response = flow.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "http://127.0.0.1:8199/other",
            "code_verifier": verifier,
        }
    )
    _json_error(response, 400, "invalid_grant", reason="redirect_uri_mismatch")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


def test_scope_outside_the_agents_registry_is_invalid_scope_without_consent_screen(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    scope_set(name="payroll:write", values={"audience": "http://payroll.test", "sensitivity": "standard"})
    flow.login()
    _, challenge = pkce_pair()
    query = flow.authorize_query(challenge=challenge, scope="catalog:read payroll:write")
    w = Watch()
    response = flow.client.get("/o/authorize/?" + query)
    _assert_error_redirect(response, "invalid_scope")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_scope", event="consent.request_refused")
    # a forged consent POST for the same request is refused the same way
    w = Watch()
    _assert_error_redirect(flow.consent(query), "invalid_scope")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_scope")


def test_scope_that_does_not_exist_at_all_is_invalid_scope(flow: OAuthFlow) -> None:
    flow.login()
    _, challenge = pkce_pair()
    w = Watch()
    response = flow.client.get(
        "/o/authorize/?" + flow.authorize_query(challenge=challenge, scope="catalog:read admin:all")
    )
    _assert_error_redirect(response, "invalid_scope")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_scope")


def test_unsupported_response_type_is_refused_without_consent_screen(flow: OAuthFlow) -> None:
    flow.login()
    _, challenge = pkce_pair()
    w = Watch()
    response = flow.client.get(
        "/o/authorize/?" + flow.authorize_query(challenge=challenge, response_type="token")
    )
    _assert_error_redirect(response, "unsupported_response_type")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="unsupported_response_type")


def test_consent_post_without_csrf_token_is_refused(scenario: Scenario) -> None:
    browser = Client(enforce_csrf_checks=True)
    assert browser.login(username="officer", password=PASSWORD)
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": scenario.agent.client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": "catalog:read",
            "state": "st-123",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    w = Watch()
    response = browser.post("/o/authorize/", {"authz_query": query, "decision": "allow", "lifetime": "3600"})
    assert response.status_code == 403
    w.assert_nothing_changed()


def test_consent_with_a_lifetime_the_agent_does_not_offer_creates_nothing(flow: OAuthFlow) -> None:
    flow.login()
    _, challenge = pkce_pair()
    w = Watch()
    response = flow.consent(flow.authorize_query(challenge=challenge), lifetime=10 * 365 * 86400)
    assert response.status_code == 200 and not response.has_header("Location")
    assert "grant lifetime outside what the agent may offer" in response.content.decode()
    w.assert_nothing_changed()


def test_consent_post_when_signed_out_creates_nothing(flow: OAuthFlow) -> None:
    _, challenge = pkce_pair()
    w = Watch()
    response = flow.consent(flow.authorize_query(challenge=challenge))
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    w.assert_nothing_changed()


# --- token endpoint: grant types and refresh ------------------------------------------------------


@pytest.mark.parametrize(
    "grant_type",
    [
        "password",
        "client_credentials",
        "implicit",
        "urn:ietf:params:oauth:grant-type:device_code",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "nonsense",
    ],
)
def test_unknown_grant_type_is_unsupported_grant_type(flow: OAuthFlow, grant_type: str) -> None:
    flow.full()
    w = Watch()
    response = flow.token(
        {"grant_type": grant_type, "username": "officer", "password": PASSWORD, "scope": "catalog:read"}
    )
    _json_error(response, 400, "unsupported_grant_type")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="unsupported_grant_type", event="token.refused")


def test_missing_grant_type_is_invalid_request(flow: OAuthFlow) -> None:
    w = Watch()
    response = flow.token({"code": "x"})
    _json_error(response, 400, "invalid_request")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_request")


def test_refresh_token_reuse_is_invalid_grant_with_one_refusal_row(flow: OAuthFlow) -> None:
    first = flow.full()
    second = flow.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}).json()
    w = Watch()
    replay = flow.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    _json_error(replay, 400, "invalid_grant", reason="refresh_token_reused")
    w.assert_nothing_changed(active_grants=-1)
    w.assert_one_refusal(error="invalid_grant")
    assert flow.introspect(second["access_token"]).json() == {"active": False}


def test_refresh_token_of_another_agent_is_invalid_grant_and_does_not_revoke(
    flow: OAuthFlow, other_agent: tuple[Agent, str]
) -> None:
    agent, secret = other_agent
    body = flow.full()
    w = Watch()
    response = flow.token(
        {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        auth=(agent.client_id, secret),
    )
    _json_error(response, 400, "invalid_grant", reason="unknown_grant")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")
    assert flow.introspect(body["access_token"]).json()["active"] is True
    assert (
        flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}).status_code == 200
    )


def test_unknown_refresh_token_is_invalid_grant(flow: OAuthFlow) -> None:
    flow.full()
    w = Watch()
    response = flow.token({"grant_type": "refresh_token", "refresh_token": "made-up"})
    _json_error(response, 400, "invalid_grant", reason="unknown_grant")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


def test_refresh_cannot_widen_scope(flow: OAuthFlow) -> None:
    """RFC 6749 §6: a refresh may not ask for more than was granted (here a step-up scope)."""
    body = flow.full(scope="catalog:read ledger:write")
    w = Watch()
    response = flow.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "scope": "catalog:read budget:read",
        }
    )
    _json_error(response, 400, "invalid_scope")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_scope")


def test_access_token_presented_as_refresh_token_is_invalid_grant(flow: OAuthFlow) -> None:
    body = flow.full()
    w = Watch()
    response = flow.token({"grant_type": "refresh_token", "refresh_token": body["access_token"]})
    _json_error(response, 400, "invalid_grant", reason="unknown_grant")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


def test_token_endpoint_refuses_get(flow: OAuthFlow) -> None:
    response = flow.client.get("/o/token/?grant_type=authorization_code&code=x")
    assert response.status_code == 405


# --- introspection (RFC 7662) ---------------------------------------------------------------------


def test_introspection_without_credentials_is_invalid_client(flow: OAuthFlow) -> None:
    token = flow.full()["access_token"]
    w = Watch()
    response = flow.client.post(
        "/o/introspect/", urlencode({"token": token}), content_type="application/x-www-form-urlencoded"
    )
    _json_error(response, 401, "invalid_client")
    assert response.has_header("WWW-Authenticate")
    assert "active" not in response.json()
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client", event="introspection.refused")


def test_introspection_with_wrong_rs_secret_is_invalid_client(flow: OAuthFlow, scenario: Scenario) -> None:
    token = flow.full()["access_token"]
    w = Watch()
    response = flow.introspect(token, auth=(scenario.rs_client_id, scenario.rs_secret + "x"))
    _json_error(response, 401, "invalid_client")
    assert "active" not in response.json()
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")


def test_introspection_with_an_agents_credentials_is_invalid_client(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    token = flow.full()["access_token"]
    w = Watch()
    response = flow.introspect(token, auth=(scenario.agent.client_id, scenario.agent_secret))
    _json_error(response, 401, "invalid_client")
    assert "sub" not in response.json()
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")


def test_introspection_by_a_deactivated_resource_server_is_invalid_client(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    from consent.models import ResourceServer

    token = flow.full()["access_token"]
    ResourceServer.objects.filter(client_id=scenario.rs_client_id).update(is_active=False)
    w = Watch()
    _json_error(flow.introspect(token), 401, "invalid_client")
    w.assert_one_refusal(error="invalid_client")


@pytest.mark.parametrize("change", ["deactivated", "secret replaced"])
@pytest.mark.parametrize("token", ["session token", "garbage", "missing"])
def test_introspection_after_the_resource_server_changed_is_invalid_client_though_it_was_verified_just_before(
    flow: OAuthFlow, scenario: Scenario, change: str, token: str
) -> None:
    """The process may reuse a recent verification of the resource server; the answer may not."""
    from consent.models import ResourceServer

    session_token = flow.full()["access_token"]
    assert flow.introspect(session_token).json()["active"] is True  # verified, and remembered
    rs = ResourceServer.objects.filter(client_id=scenario.rs_client_id)
    if change == "deactivated":
        rs.update(is_active=False)
    else:
        rs.update(client_secret="a secret set by the admin since")
    w = Watch()
    sent = {"session token": session_token, "garbage": "not-a-jwt", "missing": ""}[token]
    response = flow.introspect(sent)
    _json_error(response, 401, "invalid_client")
    assert "active" not in response.json()
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client", event="introspection.refused")


def test_introspection_by_rs_outside_the_audience_reports_inactive(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    token = flow.full()["access_token"]
    w = Watch()
    response = flow.introspect(token, auth=(scenario.ledger_client_id, scenario.ledger_secret))
    assert response.status_code == 200
    assert response.json() == {"active": False}
    w.assert_nothing_changed()
    assert len(w.refused()) == 1
    # the token itself is fine for its real audience
    assert flow.introspect(token).json()["active"] is True


@pytest.mark.parametrize("garbage", ["", "not-a-jwt", "a.b.c", "eyJhbGciOiJub25lIn0.e30.", "x" * 20000])
def test_introspection_of_garbage_never_reports_active(flow: OAuthFlow, garbage: str) -> None:
    flow.full()
    w = Watch()
    response = flow.introspect(garbage)
    if garbage == "":
        _json_error(response, 400, "invalid_request")
    else:
        assert response.status_code == 200 and response.json() == {"active": False}
    w.assert_nothing_changed()
    assert len(w.refused()) == 1


def test_introspection_of_a_refresh_token_reports_inactive(flow: OAuthFlow) -> None:
    body = flow.full()
    response = flow.introspect(body["refresh_token"])
    assert response.status_code == 200 and response.json() == {"active": False}


def test_introspection_refuses_get(flow: OAuthFlow, scenario: Scenario) -> None:
    token = flow.full()["access_token"]
    response = flow.client.get(
        "/o/introspect/?" + urlencode({"token": token}),
        HTTP_AUTHORIZATION=basic(scenario.rs_client_id, scenario.rs_secret),
    )
    assert response.status_code == 405


# --- revocation (RFC 7009) ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["access_token", "refresh_token"])
def test_revocation_by_the_agent_revokes_the_whole_grant(
    flow: OAuthFlow, scenario: Scenario, which: str
) -> None:
    body = flow.full()
    w = Watch()
    response = _revoke(flow.client, body[which], scenario.agent.client_id, scenario.agent_secret, hint=which)
    assert response.status_code == 200
    grant = SessionGrant.objects.get()
    assert grant.status == SessionGrant.Status.REVOKED and grant.end_reason == "revoked_by_agent"
    assert flow.introspect(body["access_token"]).json() == {"active": False}
    refresh = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    _json_error(refresh, 400, "invalid_grant", reason="grant_inactive")
    assert [e.event for e in w.new_events()][:1] == ["grant.revoked"]


def test_revocation_with_bad_client_credentials_is_invalid_client(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    body = flow.full()
    w = Watch()
    response = _revoke(flow.client, body["access_token"], scenario.agent.client_id, "wrong-secret")
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client", event="revocation.refused")
    assert flow.introspect(body["access_token"]).json()["active"] is True


def test_revocation_without_client_credentials_is_invalid_client(flow: OAuthFlow) -> None:
    body = flow.full()
    w = Watch()
    response = flow.client.post(
        "/o/revoke/",
        urlencode({"token": body["access_token"]}),
        content_type="application/x-www-form-urlencoded",
    )
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")
    assert flow.introspect(body["access_token"]).json()["active"] is True


def test_revocation_by_a_resource_server_is_invalid_client(flow: OAuthFlow, scenario: Scenario) -> None:
    body = flow.full()
    w = Watch()
    response = _revoke(flow.client, body["access_token"], scenario.rs_client_id, scenario.rs_secret)
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")
    assert flow.introspect(body["access_token"]).json()["active"] is True


def test_another_agent_cannot_revoke_someone_elses_token(
    flow: OAuthFlow, other_agent: tuple[Agent, str]
) -> None:
    agent, secret = other_agent
    body = flow.full()
    response = _revoke(flow.client, body["access_token"], agent.client_id, secret)
    assert response.status_code == 200  # RFC 7009 §2.2: no oracle for other clients' tokens
    assert SessionGrant.objects.get().status == SessionGrant.Status.ACTIVE
    assert flow.introspect(body["access_token"]).json()["active"] is True


def test_user_cannot_use_someone_elses_session_to_consent_for_them(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    """Grants are always created for the signed-in user, whatever the query says."""
    mallory = get_user_model().objects.create_user("mallory", password=PASSWORD)
    browser = Client()
    assert browser.login(username="mallory", password=PASSWORD)
    _, challenge = pkce_pair()
    response = browser.post(
        "/o/authorize/",
        {
            "authz_query": flow.authorize_query(challenge=challenge, user=str(scenario.user.pk)),
            "decision": "allow",
            "lifetime": "3600",
        },
    )
    assert response.status_code == 302
    assert SessionGrant.objects.get().user == mallory


def test_duplicate_redirect_uri_parameter_gets_an_error_page(flow: OAuthFlow) -> None:
    """RFC 6749 §3.1: parameters must not repeat; a second redirect_uri never wins."""
    flow.login()
    _, challenge = pkce_pair()
    query = (
        flow.authorize_query(challenge=challenge)
        + "&"
        + urlencode({"redirect_uri": "https://evil.example/cb"})
    )
    w = Watch()
    response = flow.client.get("/o/authorize/?" + query)
    _assert_error_page(response, 400)
    w.assert_nothing_changed()
    assert len(w.refused()) == 1


def test_error_page_does_not_reflect_markup(flow: OAuthFlow) -> None:
    flow.login()
    response = flow.client.get(
        "/o/authorize/?"
        + urlencode(
            {
                "response_type": "code",
                "client_id": "<script>alert(1)</script>",
                "redirect_uri": "https://evil.example/<script>",
                "scope": "<b>x</b>",
            }
        )
    )
    _assert_error_page(response, 400)
    assert "<script>" not in response.content.decode()


def test_grant_past_its_lifetime_stops_tokens_even_before_the_expiry_job_runs(flow: OAuthFlow) -> None:
    from django.utils import timezone

    body = flow.full()
    SessionGrant.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert flow.introspect(body["access_token"]).json() == {"active": False}
    w = Watch()
    response = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    _json_error(response, 400, "invalid_grant", reason="grant_inactive")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_grant")


# --- faults: two requests racing with the same single-use credential ------------------------------


def _race(
    monkeypatch: pytest.MonkeyPatch,
    grant_module: ModuleType,
    requests: list[Callable[[Client], ClientResponse]],
) -> list[ClientResponse]:
    """Run ``requests`` (callables taking a Client) in threads, all held just before the grant's
    locking read of its credential row until every one of them has got that far, so they really
    overlap."""
    import threading

    from django.db import connection

    barrier = threading.Barrier(len(requests), timeout=20)
    original = grant_module._read
    reached: list[int] = []

    def held(*args: Any, **kwargs: Any) -> Any:
        reached.append(1)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return original(*args, **kwargs)

    monkeypatch.setattr(grant_module, "_read", held)
    results: list[ClientResponse | None] = [None] * len(requests)

    def run(i: int, fn: Callable[[Client], ClientResponse]) -> None:
        try:
            results[i] = fn(Client())
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.setattr(grant_module, "_read", original)
    assert len(reached) == len(requests)  # every request really got to the locking read
    answered = [r for r in results if r is not None]
    assert len(answered) == len(requests)  # and every one of them was answered
    return answered


def _post_token(client: Client, data: dict[str, str], scenario: Scenario) -> ClientResponse:
    return client.post(
        "/o/token/",
        urlencode(data),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(scenario.agent.client_id, scenario.agent_secret),
    )


@pytest.mark.django_db(transaction=True)
def test_concurrent_exchanges_of_one_code_yield_exactly_one_token(
    flow: OAuthFlow, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, verifier = _code(flow)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    results = _race(
        monkeypatch,
        authorization_code,
        [lambda c: _post_token(c, data, scenario), lambda c: _post_token(c, data, scenario)],
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 400], [r.content for r in results]
    assert AccessToken.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_refreshes_with_one_refresh_token_yield_exactly_one_new_token(
    flow: OAuthFlow, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = flow.full()
    data = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    # Both requests are held until each has entered refresh-token validation, so they overlap;
    # the row lock there then serialises them.
    results = _race(
        monkeypatch,
        refresh,
        [lambda c: _post_token(c, data, scenario), lambda c: _post_token(c, data, scenario)],
    )
    ok = [r for r in results if r.status_code == 200]
    # never a "success" carrying empty tokens
    for r in ok:
        assert r.json()["access_token"] and r.json()["refresh_token"], r.content[:300]
    assert len(ok) == 1, [(r.status_code, r.content[:200]) for r in results]
    other = next(r for r in results if r.status_code != 200)
    assert other.status_code == 400 and other.json()["error"] == "invalid_grant"


# --- the same refusals with credentials in the form body (client_secret_post) ---------------------


def test_wrong_secret_in_the_form_body_is_invalid_client(flow: OAuthFlow, scenario: Scenario) -> None:
    code, verifier = _code(flow)
    w = Watch()
    response = flow.client.post(
        "/o/token/",
        urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                "client_id": scenario.agent.client_id,
                "client_secret": "wrong",
            }
        ),
        content_type="application/x-www-form-urlencoded",
    )
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")


@pytest.mark.parametrize("who", ["agent", "wrong_rs_secret"])
def test_introspection_with_bad_credentials_in_the_form_body_is_invalid_client(
    flow: OAuthFlow, scenario: Scenario, who: str
) -> None:
    token = flow.full()["access_token"]
    creds = (
        {"client_id": scenario.agent.client_id, "client_secret": scenario.agent_secret}
        if who == "agent"
        else {"client_id": scenario.rs_client_id, "client_secret": "wrong"}
    )
    w = Watch()
    response = flow.client.post(
        "/o/introspect/",
        urlencode({"token": token, **creds}),
        content_type="application/x-www-form-urlencoded",
    )
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")


def test_introspection_with_rs_credentials_in_the_form_body_works(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    token = flow.full()["access_token"]
    response = flow.client.post(
        "/o/introspect/",
        urlencode({"token": token, "client_id": scenario.rs_client_id, "client_secret": scenario.rs_secret}),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200 and response.json()["active"] is True


def test_suspended_agent_cannot_use_the_revocation_endpoint(flow: OAuthFlow, scenario: Scenario) -> None:
    body = flow.full()
    Agent.objects.filter(pk=scenario.agent.pk).update(status=Agent.Status.SUSPENDED)
    w = Watch()
    response = _revoke(flow.client, body["access_token"], scenario.agent.client_id, scenario.agent_secret)
    _json_error(response, 401, "invalid_client")
    w.assert_nothing_changed()
    w.assert_one_refusal(error="invalid_client")

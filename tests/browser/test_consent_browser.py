"""The consent flow in a real Chromium: sign in, read the consent screen, Allow or Deny.

The agent's side (code exchange) and the resource server's side (token verification through
discovery and the JWKS) go over real HTTP to the live server, as they would in production.
"""

import re
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import jwt
import pytest
from playwright.sync_api import Page, expect

from audit.models import AuditEvent
from consent.models import SessionGrant
from tests.browser.conftest import BrowserScenario
from tests.conftest import PASSWORD, pkce_pair

pytestmark = [pytest.mark.browser]

SCREENSHOT = "/tmp/consent.png"
STATE = "st-browser-123"


def _authorize_url(s: BrowserScenario, challenge: str) -> str:
    return "/o/authorize/?" + urlencode(
        {
            "response_type": "code",
            "client_id": s.agent.client_id,
            "redirect_uri": s.redirect_uri,
            "scope": "catalog:read budget:read ledger:write",
            "state": STATE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )


def _sign_in_to_consent(page: Page, s: BrowserScenario, challenge: str) -> None:
    """Open the authorize URL signed out, get sent to the login page, sign in, land on consent."""
    page.goto(_authorize_url(s, challenge))
    page.wait_for_url(re.compile(r"/accounts/login/\?"))
    assert urlparse(page.url).path == "/accounts/login/"
    # The login page remembers where to go back to: the full authorize request.
    next_target = parse_qs(urlparse(page.url).query)["next"][0]
    assert next_target.startswith("/o/authorize/?") and f"client_id={s.agent.client_id}" in next_target

    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/o/authorize/\?"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Procurement Agent wants to act for you")


def _callback_params(page: Page, s: BrowserScenario) -> dict[str, list[str]]:
    page.wait_for_url(re.compile(re.escape(s.redirect_uri) + r"\?"))
    assert page.url.startswith(s.redirect_uri + "?"), page.url
    return parse_qs(urlparse(page.url).query)


def _http() -> httpx.Client:
    # trust_env=False: the live server is on loopback; no proxy from the environment may interfere.
    return httpx.Client(trust_env=False, timeout=10)


def test_allow_in_browser_issues_a_token_a_resource_server_accepts(
    page: Page, page_problems: list[str], browser_scenario: BrowserScenario
) -> None:
    s = browser_scenario
    verifier, challenge = pkce_pair()
    _sign_in_to_consent(page, s, challenge)

    # Who is asking.
    card = page.locator("main .card")
    expect(card).to_contain_text("Procurement Agent")
    expect(card).to_contain_text("by Acme Agents")

    # The two groups, found by their accessible names (ul aria-labelledby the headings).
    allowed = page.get_by_role("list", name="Allowed for this session")
    ask = page.get_by_role("list", name="Will ask you each time")
    expect(allowed.get_by_role("listitem")).to_have_count(2)
    expect(allowed).to_contain_text("catalog:read")
    expect(allowed).to_contain_text("budget:read")
    expect(allowed).not_to_contain_text("ledger:write")
    expect(ask.get_by_role("listitem")).to_have_count(1)
    expect(ask).to_contain_text("ledger:write")
    expect(page.get_by_role("button", name="Deny")).to_be_visible()
    lifetime = page.get_by_label("Keep this connection for")
    expect(lifetime).to_have_value("3600")
    # Capped by the agent's max_grant_lifetime (default 7 days).
    expect(lifetime.locator("option")).to_have_text(["1 hour", "8 hours", "1 day", "7 days"])
    # The stylesheet loaded (served by the app itself) and nothing errored while getting here.
    assert page.evaluate("getComputedStyle(document.querySelector('main .card')).borderStyle") != "none"
    assert page_problems == []
    page.screenshot(path=SCREENSHOT, full_page=True)

    page.get_by_role("button", name="Allow").click()
    params = _callback_params(page, s)
    assert params["state"] == [STATE]
    assert "error" not in params
    code = params["code"][0]

    with _http() as http:
        # The agent exchanges the code, authenticating with HTTP Basic and proving PKCE.
        response = http.post(
            f"{s.base_url}/o/token/",
            auth=(s.agent.client_id, s.agent_secret),
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": s.redirect_uri,
                "code_verifier": verifier,
            },
        )
        assert response.status_code == 200, response.text
        assert "no-store" in response.headers.get("cache-control", "")
        body = response.json()
        assert body["token_type"].lower() == "bearer"
        assert body["scope"] == "catalog:read budget:read"
        token = body["access_token"]

        # A downstream resource server: discovery -> jwks_uri -> key by kid -> verify.
        metadata = http.get(f"{s.base_url}/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == s.base_url
        jwks = http.get(metadata["jwks_uri"]).json()

    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    keys = {k["kid"]: k for k in jwks["keys"]}
    assert header["kid"] in keys, f"kid {header['kid']!r} not in the published JWKS {list(keys)}"
    key = jwt.PyJWK(keys[header["kid"]])
    claims = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        issuer=s.base_url,
        audience=s.rs_audience,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    assert claims["sub"] == f"user:{s.user.pk}"
    assert claims["act"] == {"sub": f"agent:{s.agent.client_id}"}
    assert claims["exp"] - claims["iat"] == 900
    assert "ledger:write" not in claims["scope"].split()
    assert sorted(claims["scope"].split()) == ["budget:read", "catalog:read"]

    grant = SessionGrant.objects.get()
    assert str(grant.pk) == claims["grant_id"]
    assert grant.user_id == s.user.pk and grant.agent_id == s.agent.pk
    assert grant.step_up_scopes == ["ledger:write"]


def test_deny_in_browser_redirects_with_access_denied_and_creates_no_grant(
    page: Page, browser_scenario: BrowserScenario
) -> None:
    s = browser_scenario
    _, challenge = pkce_pair()
    _sign_in_to_consent(page, s, challenge)

    page.get_by_role("button", name="Deny").click()
    params = _callback_params(page, s)
    assert params["error"] == ["access_denied"]
    assert params["state"] == [STATE]
    assert "code" not in params
    assert SessionGrant.objects.count() == 0
    assert AuditEvent.objects.filter(event="consent.refused", outcome="refused").count() == 1

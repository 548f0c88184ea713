"""The user's pages: Connected agents (/grants/, with Revoke) and Activity (/activity/)."""

import re
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.test import Client

from audit.models import AuditEvent
from audit.services import audit_record
from consent.models import SessionGrant
from tests.conftest import PASSWORD, REDIRECT_URI, OAuthFlow, Scenario, pkce_pair

pytestmark = pytest.mark.django_db


@dataclass
class Mallory:
    """Another user, signed in in her own browser, and her grant."""

    user: User
    browser: Client
    grant: SessionGrant

    @property
    def pk(self) -> int:
        return self.user.pk


@pytest.fixture
def mallory(scenario: Scenario) -> Mallory:
    """A second user of the same server, with her own grant to the same agent."""
    user = get_user_model().objects.create_user("mallory", password=PASSWORD)
    browser = Client()
    assert browser.login(username="mallory", password=PASSWORD)
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
    response = browser.post("/o/authorize/", {"authz_query": query, "decision": "allow", "lifetime": "3600"})
    assert response.status_code == 302 and "code=" in response["Location"]
    return Mallory(user, browser, SessionGrant.objects.get(user=user))


def _revoke_forms(html: str) -> list[str]:
    return re.findall(r'<form method="post" action="/grants/([0-9a-f-]+)/revoke/">', html)


def _page(client: Client, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200
    return response.content.decode()


# --- /grants/ -------------------------------------------------------------------------------------


def test_grants_page_lists_active_grants_with_a_revoke_button(flow: OAuthFlow, scenario: Scenario) -> None:
    flow.full()
    grant = SessionGrant.objects.get()
    html = _page(flow.client, "/grants/")
    assert "Procurement Agent" in html and "Acme Agents" in html
    assert _revoke_forms(html) == [str(grant.pk)]
    form = html.split(f'action="/grants/{grant.pk}/revoke/">')[1].split("</form>")[0]
    assert "csrfmiddlewaretoken" in form
    assert re.search(r"<button[^>]*>Revoke</button>", form)
    assert "catalog:read" in html and "budget:read" in html and "ledger:write" in html


def test_grants_page_needs_sign_in(client: Client, scenario: Scenario) -> None:
    response = client.get("/grants/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_grants_page_shows_only_my_grants(flow: OAuthFlow, mallory: Mallory) -> None:
    flow.full()
    mine = SessionGrant.objects.get(user=flow.s.user)
    assert _revoke_forms(_page(flow.client, "/grants/")) == [str(mine.pk)]
    assert _revoke_forms(_page(mallory.browser, "/grants/")) == [str(mallory.grant.pk)]


def test_revoke_stops_the_agents_tokens_at_once(flow: OAuthFlow) -> None:
    body = flow.full()
    grant = SessionGrant.objects.get()
    assert flow.introspect(body["access_token"]).json()["active"] is True

    response = flow.client.post(f"/grants/{grant.pk}/revoke/")
    assert response.status_code == 302 and response["Location"] == "/grants/"

    assert flow.introspect(body["access_token"]).json() == {"active": False}
    refresh = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"
    grant.refresh_from_db()
    assert grant.status == SessionGrant.Status.REVOKED and grant.end_reason == "revoked_by_user"
    assert grant.ended_at is not None
    event = AuditEvent.objects.get(event="grant.revoked")
    assert event.actor == f"user:{flow.s.user.pk}" and event.grant_id == str(grant.pk)

    html = _page(flow.client, "/grants/")
    assert _revoke_forms(html) == []
    assert "Ended" in html and "Revoked" in html
    assert "tokens stopped working" in html  # the confirmation message


def test_revoking_twice_is_404_and_audited_once(flow: OAuthFlow) -> None:
    flow.full()
    grant = SessionGrant.objects.get()
    assert flow.client.post(f"/grants/{grant.pk}/revoke/").status_code == 302
    assert flow.client.post(f"/grants/{grant.pk}/revoke/").status_code == 404
    assert AuditEvent.objects.filter(event="grant.revoked").count() == 1


def test_revoking_another_users_grant_is_404_and_changes_nothing(flow: OAuthFlow, mallory: Mallory) -> None:
    body = flow.full()
    mine = SessionGrant.objects.get(user=flow.s.user)
    before = AuditEvent.objects.filter(event="grant.revoked").count()

    response = mallory.browser.post(f"/grants/{mine.pk}/revoke/")
    assert response.status_code == 404

    mine.refresh_from_db()
    assert mine.status == SessionGrant.Status.ACTIVE and mine.ended_at is None
    assert flow.introspect(body["access_token"]).json()["active"] is True
    assert AuditEvent.objects.filter(event="grant.revoked").count() == before
    # and her own grant is untouched too
    mallory.grant.refresh_from_db()
    assert mallory.grant.status == SessionGrant.Status.ACTIVE


def test_revoking_a_grant_id_that_does_not_exist_is_404(flow: OAuthFlow) -> None:
    flow.login()
    response = flow.client.post("/grants/00000000-0000-0000-0000-000000000000/revoke/")
    assert response.status_code == 404


def test_get_on_the_revoke_url_is_not_allowed_and_changes_nothing(flow: OAuthFlow) -> None:
    body = flow.full()
    grant = SessionGrant.objects.get()
    response = flow.client.get(f"/grants/{grant.pk}/revoke/")
    assert response.status_code == 405
    grant.refresh_from_db()
    assert grant.status == SessionGrant.Status.ACTIVE
    assert flow.introspect(body["access_token"]).json()["active"] is True


def test_revoke_without_csrf_token_is_refused(scenario: Scenario) -> None:
    browser = Client(enforce_csrf_checks=True)
    flow = OAuthFlow(browser, scenario)
    flow.login()
    _, challenge = pkce_pair()
    # consent through the real form, CSRF token included
    page = browser.get("/o/authorize/?" + flow.authorize_query(challenge=challenge))
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert found is not None
    token = found.group(1)
    response = browser.post(
        "/o/authorize/",
        {
            "authz_query": flow.authorize_query(challenge=challenge),
            "decision": "allow",
            "lifetime": "3600",
            "csrfmiddlewaretoken": token,
        },
    )
    assert response.status_code == 302
    grant = SessionGrant.objects.get()

    forged = browser.post(f"/grants/{grant.pk}/revoke/")  # a cross-site form post carries no token
    assert forged.status_code == 403
    grant.refresh_from_db()
    assert grant.status == SessionGrant.Status.ACTIVE


def test_revoke_when_signed_out_changes_nothing(flow: OAuthFlow, client: Client) -> None:
    flow.full()
    grant = SessionGrant.objects.get()
    response = Client().post(f"/grants/{grant.pk}/revoke/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    grant.refresh_from_db()
    assert grant.status == SessionGrant.Status.ACTIVE


# --- /activity/ -----------------------------------------------------------------------------------


def _event_names(html: str) -> list[str]:
    return re.findall(r'<li data-event="([^"]+)"', html)


def test_activity_shows_my_consent_tokens_and_revocation(flow: OAuthFlow) -> None:
    body = flow.full()
    grant = SessionGrant.objects.get()
    flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    flow.client.post(f"/grants/{grant.pk}/revoke/")
    events = _event_names(_page(flow.client, "/activity/"))
    for name in ("consent.given", "token.issued", "token.refreshed", "grant.revoked"):
        assert name in events, events
    assert events[0] == "grant.revoked"  # newest first


def test_activity_shows_only_my_own_events(flow: OAuthFlow, mallory: Mallory) -> None:
    flow.full()
    officer = flow.s.user
    audit_record(
        event="secret.thing",
        actor=f"user:{mallory.pk}",
        user_id=mallory.pk,
        detail={"reason": "mallory-private-detail"},
    )
    audit_record(event="system.thing", actor="system", detail={"reason": "no-user-detail"})

    html = _page(flow.client, "/activity/")
    assert "You connected Procurement Agent" in html
    assert "another user" not in html
    assert "mallory-private-detail" not in html and "secret.thing" not in html
    assert "no-user-detail" not in html and "system.thing" not in html
    shown = len(_event_names(html))
    assert shown == AuditEvent.objects.filter(user_id=officer.pk).count()

    theirs = _page(mallory.browser, "/activity/")
    assert "mallory-private-detail" in theirs
    assert "another user" not in theirs
    assert "token.issued" not in _event_names(theirs)  # only the officer's agent exchanged a code


def test_activity_shows_why_my_grant_was_revoked_after_refresh_token_reuse(flow: OAuthFlow) -> None:
    body = flow.full()
    flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})  # reuse
    html = _page(flow.client, "/activity/")
    assert "grant.revoked" in _event_names(html)
    assert "a used refresh token was presented again, so it was ended to be safe" in html


def test_activity_needs_sign_in(client: Client, scenario: Scenario) -> None:
    response = client.get("/activity/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")

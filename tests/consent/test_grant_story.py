"""/grants/ tells connections apart; /grants/<id>/ tells one connection's story."""

import re

import pytest
from django.contrib.auth.models import User
from django.test import Client

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.models import SessionGrant
from tests.approvals.conftest import Agent
from tests.conftest import PASSWORD, ClientResponse, OAuthFlow, Scenario

pytestmark = pytest.mark.django_db


def _text(response: ClientResponse) -> str:
    html = response.content.decode()
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html[html.index("<main>") :]))


def test_each_grant_shows_when_it_started_how_much_it_was_used_and_what_it_did_last(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    for _ in range(2):
        flow.full()
    client = flow.client
    html = client.get("/grants/").content.decode()
    grants = list(SessionGrant.objects.order_by("created"))
    assert len(re.findall(r'class="card grant"', html)) == 2
    for g in grants:
        assert f'href="/grants/{g.pk}/"' in html
    text = _text(client.get("/grants/"))
    assert text.count("Started") == 2 and text.count("Last used") == 2
    assert "1 token" in text and "Latest: Procurement Agent received a session token" in text


def test_the_story_of_one_grant_from_consent_to_its_end(
    agent: Agent, client: Client, scenario: Scenario
) -> None:
    body = agent.ask().json()
    client.login(username="officer", password=PASSWORD)
    approval = ApprovalRequest.objects.get()
    client.post(f"/approvals/{approval.pk}/approve/")
    token = agent.poll(body["auth_req_id"]).json()["access_token"]
    assert agent.redeem(token).status_code == 200
    grant = SessionGrant.objects.get()
    page = client.get(f"/grants/{grant.pk}/")
    text = _text(page)
    assert "What you agreed to" in text and "signed in with password" in text
    assert "Use catalog:read" in text  # what the consent screen showed
    order = [
        "You connected Procurement Agent",
        "Procurement Agent received a session token",
        "Procurement Agent asked for your approval: Append 4250.00 USD",
        "You approved Append 4250.00 USD",
        "collected its single-use token",
        "Procurement Agent wrote 4250.00 USD to Ledger, approved by you with password",
    ]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions), text
    assert re.search(r"<button[^>]*>Revoke</button>", page.content.decode())

    response = client.post(f"/grants/{grant.pk}/revoke/", {"next": f"/grants/{grant.pk}/"})
    assert response.status_code == 302 and response["Location"] == f"/grants/{grant.pk}/"
    ended = _text(client.get(f"/grants/{grant.pk}/"))
    assert "The connection to Procurement Agent ended: you revoked it." in ended
    assert ">Revoke<" not in client.get(f"/grants/{grant.pk}/").content.decode()
    fragment = client.get(f"/grants/{grant.pk}/?part=timeline").content.decode()
    assert fragment.startswith('<ol class="activity timeline" id="timeline"') and "<main>" not in fragment


def test_another_users_grant_is_not_found(
    flow: OAuthFlow, scenario: Scenario, django_user_model: type[User]
) -> None:
    flow.full()
    grant = SessionGrant.objects.get()
    django_user_model.objects.create_user("mallory", password=PASSWORD)
    flow.client.logout()
    flow.client.login(username="mallory", password=PASSWORD)
    assert flow.client.get(f"/grants/{grant.pk}/").status_code == 404
    assert flow.client.get("/grants/00000000-0000-0000-0000-000000000000/").status_code == 404
    assert AuditEvent.objects.filter(event="grant.view_refused").count() == 2

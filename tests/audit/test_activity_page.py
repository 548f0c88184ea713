"""/activity/: the person's trail in sentences with names, filterable, times they can read."""

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from time_machine import TimeMachineFixture

from tests.approvals.conftest import Agent
from tests.conftest import PASSWORD, ClientResponse, Scenario

pytestmark = pytest.mark.django_db


@pytest.fixture
def redeemed(agent: Agent, client: Client) -> str:
    token = agent.approved_token(client)
    assert agent.redeem(token).status_code == 200
    assert agent.redeem(token).status_code == 400  # refused: already redeemed
    return token


def _text(response: ClientResponse) -> str:
    html = response.content.decode()
    body = html[html.index("<main>") :]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def test_events_read_as_sentences_with_names(redeemed: str, client: Client, scenario: Scenario) -> None:
    text = _text(client.get("/activity/"))
    assert "Procurement Agent wrote 4250.00 USD to Ledger, approved by you with password." in text
    assert "You connected Procurement Agent" in text
    assert "Procurement Agent asked for your approval: Append 4250.00 USD to Acme Office Supply" in text
    assert "You approved Append 4250.00 USD" in text
    assert "Ledger could not use a single-use token: action token already redeemed." in text
    # no raw identifiers or event codes
    assert scenario.agent.client_id not in text and scenario.ledger_client_id not in text
    assert not re.search(r"\b(agent|rs|user):", text)
    assert "action_token.redeemed" not in text and "approval.delivered" not in text
    assert "0 minutes ago" not in text and "just now" in text


def test_filters_by_outcome_agent_and_period(
    redeemed: str, client: Client, scenario: Scenario, time_machine: TimeMachineFixture
) -> None:
    refused = _text(client.get("/activity/?outcome=refused"))
    assert "could not use a single-use token" in refused and "You connected" not in refused
    ok = _text(client.get("/activity/?outcome=ok"))
    assert "could not use a single-use token" not in ok and "You connected" in ok
    mine = _text(client.get(f"/activity/?agent={scenario.agent.client_id}"))
    assert "You connected Procurement Agent" in mine and "You signed in" not in mine
    time_machine.move_to(timezone.now() + timedelta(days=3))
    client.login(username="officer", password=PASSWORD)
    assert "You connected" not in _text(client.get("/activity/?period=day"))
    assert "You connected" in _text(client.get("/activity/?period=week"))
    # unknown filter values are ignored, not errors
    assert client.get("/activity/?outcome=<x>&agent=nope&period=forever").status_code == 200


def test_times_follow_the_browsers_time_zone(redeemed: str, client: Client) -> None:
    client.cookies["tz"] = "Asia/Kolkata"
    html = client.get("/activity/").content.decode()
    local = timezone.localtime(timezone.now(), timezone=timezone.get_fixed_timezone(330))
    assert local.strftime("%H:") in html and " UTC</time>" not in html
    client.cookies["tz"] = "Not/AZone"
    assert " UTC</time>" in client.get("/activity/").content.decode()

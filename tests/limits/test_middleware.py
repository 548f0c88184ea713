"""The HTTP rate limits and the attempt limit on client and resource-server secrets, black-box:
real HTTP to a live stack with small limits (``conftest.RATE_LIMITS`` / ``ATTEMPT_LIMITS``)."""

import dataclasses
import statistics
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from django.test import Client

from audit.models import AuditEvent
from consent.models import AccessToken, RefreshToken
from consent.services import agent_create
from tests.conftest import REDIRECT_URI, OAuthFlow, Scenario, basic
from tests.limits.conftest import ATTEMPT_LIMITS, RATE_LIMITS, from_source, refusals
from tests.live import LiveStack

CLIENT_RATE = RATE_LIMITS["protocol"]["client"][0]
SOURCE_FAILURES = ATTEMPT_LIMITS["client"]["source"]
FLOOD_THREADS = 2


def _refresh(http: httpx.Client, url: str, agent_id: str, secret: str, refresh_token: str) -> httpx.Response:
    return http.post(
        f"{url}/o/token/",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers={"Authorization": basic(agent_id, secret)},
    )


def _rows(**filters: Any) -> int:
    return AuditEvent.objects.filter(**filters).count()


def test_a_client_over_its_rate_gets_429_with_retry_after_and_one_audit_row(
    limited: LiveStack, flow: OAuthFlow, scenario: Scenario
) -> None:
    refresh_token = flow.full()["refresh_token"]
    agent_id, secret = scenario.agent.client_id, scenario.agent_secret
    tokens_before = AccessToken.objects.count()
    with from_source("127.0.0.2") as http:
        # Authenticated, refused for another reason: they use the rate up (the code exchange was one).
        for _ in range(CLIENT_RATE - 1):
            assert _refresh(http, limited.url, agent_id, secret, "not-a-refresh-token").status_code == 400
        before = refusals().get("rate:protocol:client", 0)
        refused = [_refresh(http, limited.url, agent_id, secret, refresh_token) for _ in range(15)]
        poll = http.post(
            f"{limited.url}/o/token/",
            data={"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": "x"},
            headers={"Authorization": basic(agent_id, secret)},
        )
    for response in refused:
        assert response.status_code == 429
        assert response.json()["error"] == "temporarily_unavailable"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert response.headers["Cache-Control"] == "no-store"
    # CIBA Core §11 names the polling case: slow_down.
    assert poll.status_code == 429 and poll.json()["error"] == "slow_down" and "Retry-After" in poll.headers
    # Nothing changed: the refresh token is still the live one, no token was minted.
    assert RefreshToken.objects.filter(revoked__isnull=True, session_grant__agent=scenario.agent).count() == 1
    assert AccessToken.objects.count() == tokens_before
    # One audit row for the window; every refusal counted.
    assert _rows(event="rate.limited", client_id=agent_id) == 1
    assert refusals()["rate:protocol:client"] - before == 16


def test_wrong_client_secrets_lock_the_source_out_with_backoff_and_one_audit_row(
    limited: LiveStack, flow: OAuthFlow, scenario: Scenario
) -> None:
    refresh_token = flow.full()["refresh_token"]
    agent_id = scenario.agent.client_id
    with from_source("127.0.0.3") as http:
        wrong = [
            _refresh(http, limited.url, agent_id, "wrong-secret", refresh_token)
            for _ in range(SOURCE_FAILURES)
        ]
        right = _refresh(http, limited.url, agent_id, scenario.agent_secret, refresh_token)
        more = [_refresh(http, limited.url, agent_id, "wrong-secret", refresh_token) for _ in range(10)]
    assert [r.status_code for r in wrong] == [401] * SOURCE_FAILURES
    # Locked: even the right secret is not checked, and the answer says when to come back.
    assert right.status_code == 429 and right.json()["error"] == "temporarily_unavailable"
    assert "try again in 2 minutes" in right.json()["error_description"]
    assert 100 <= int(right.headers["Retry-After"]) <= 120
    assert {r.status_code for r in more} == {429}
    assert RefreshToken.objects.filter(revoked__isnull=True, session_grant__agent=scenario.agent).count() == 1
    locked = AuditEvent.objects.filter(event="attempts.locked", remote_addr="127.0.0.3")
    assert locked.count() == 1 and locked.get().detail["kind"] == "client"
    assert locked.get().detail["locked"] == ["source"]
    assert _rows(event="token.refused", remote_addr="127.0.0.3") == SOURCE_FAILURES  # none while locked
    assert refusals()["locked:client:source"] >= 11
    # Another source is not locked (the account's own limit is higher), and a refused guess did
    # not use up the client's rate.
    with from_source("127.0.0.4") as http:
        assert _refresh(http, limited.url, agent_id, scenario.agent_secret, refresh_token).status_code == 200


def test_resource_server_credentials_are_attempt_limited_too(limited: LiveStack, scenario: Scenario) -> None:
    with from_source("127.0.0.5") as http:
        answers = [
            http.post(
                f"{limited.url}/o/introspect/",
                data={"token": "x"},
                headers={"Authorization": basic(scenario.rs_client_id, "wrong")},
            )
            for _ in range(SOURCE_FAILURES + 3)
        ]
        right = http.post(
            f"{limited.url}/o/introspect/",
            data={"token": "x"},
            headers={"Authorization": basic(scenario.rs_client_id, scenario.rs_secret)},
        )
    assert [r.status_code for r in answers] == [401] * SOURCE_FAILURES + [429] * 3
    assert right.status_code == 429 and "Retry-After" in right.headers
    assert _rows(event="attempts.locked", remote_addr="127.0.0.5") == 1
    assert _rows(event="introspection.refused", remote_addr="127.0.0.5") == SOURCE_FAILURES


def test_guessing_approval_ids_is_rate_limited_per_user(limited: LiveStack, scenario: Scenario) -> None:
    browser = Client()
    browser.force_login(scenario.user)
    cookies = {"sessionid": browser.cookies["sessionid"].value}
    with from_source("127.0.0.6", cookies=cookies) as http:
        http.get(f"{limited.url}/accounts/login/")  # the CSRF cookie
        token = http.cookies["csrftoken"]
        user_limit = RATE_LIMITS["pages"]["user"][0]
        answers = [
            http.post(f"{limited.url}/approvals/{uuid.uuid4()}/approve/", headers={"X-CSRFToken": token})
            for _ in range(user_limit + 30)
        ]
    codes = [r.status_code for r in answers]
    assert 404 in codes and codes[-30:] == [429] * 30
    assert "Too many requests" in answers[-1].text and "Retry-After" in answers[-1].headers
    # The audit table grows by the limit, not by the flood.
    assert _rows(event="approval.decision_refused", user_id=scenario.user.pk) < user_limit
    assert _rows(event="rate.limited", user_id=scenario.user.pk) == 1


def _second_agent_flow(scenario: Scenario) -> tuple[OAuthFlow, str, str]:
    agent, secret = agent_create(
        name="Other Agent", publisher="Other", scopes=["catalog:read"], redirect_uris=[REDIRECT_URI]
    )
    other = dataclasses.replace(scenario, agent=agent, agent_secret=secret)
    return OAuthFlow(Client(), other), agent.client_id, secret


def test_a_flood_of_refused_requests_does_not_slow_another_client(
    limited: LiveStack, flow: OAuthFlow, scenario: Scenario
) -> None:
    """Client A floods the token endpoint with wrong secrets from its own address; client B's
    refreshes are timed in interleaved quiet and flooded rounds. Refusals are answered before
    any SQL, so B's median slows by a small factor only, and the audit table grows by the attempt
    limit (plus the requests in flight when it trips) and one row, however long the flood."""
    victim_flow, victim_id, victim_secret = _second_agent_flow(scenario)
    refresh_token = victim_flow.full(scope="catalog:read")["refresh_token"]
    rows_before = AuditEvent.objects.filter(remote_addr="127.0.0.7").count()
    flood_sent, stop = [0], threading.Event()

    def flood() -> None:
        with from_source("127.0.0.7") as http:
            while not stop.is_set():
                _refresh(http, limited.url, scenario.agent.client_id, "wrong", "x")
                flood_sent[0] += 1

    quiet: list[float] = []
    flooded: list[float] = []
    with from_source("127.0.0.8") as http:

        def timed_refreshes(into: list[float], n: int = 12) -> None:
            nonlocal refresh_token
            for _ in range(n):
                started = time.perf_counter()
                response = _refresh(http, limited.url, victim_id, victim_secret, refresh_token)
                into.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                refresh_token = response.json()["refresh_token"]

        timed_refreshes([])  # warm up connections and caches
        for _ in range(3):
            timed_refreshes(quiet)
            stop.clear()
            threads = [threading.Thread(target=flood) for _ in range(FLOOD_THREADS)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            timed_refreshes(flooded)
            stop.set()
            for t in threads:
                t.join()
    ratio = statistics.median(flooded) / statistics.median(quiet)
    print(
        f"flood: {flood_sent[0]} refused requests; victim median {statistics.median(quiet) * 1000:.1f} ms quiet,"
        f" {statistics.median(flooded) * 1000:.1f} ms flooded, ratio {ratio:.2f}"
    )
    assert flood_sent[0] > 200, flood_sent
    assert ratio < 4.0, (ratio, statistics.median(quiet), statistics.median(flooded), flood_sent)
    flood_rows = AuditEvent.objects.filter(remote_addr="127.0.0.7").count() - rows_before
    # The lockout is checked before a request and counted after it, so up to one request per
    # flooding connection may be in flight when it trips: the bound is the limit plus those, plus
    # the lockout's own row, however long the flood lasts.
    assert flood_rows <= SOURCE_FAILURES + FLOOD_THREADS + 1, flood_rows
    assert refusals()["locked:client:source"] >= flood_sent[0] - SOURCE_FAILURES - FLOOD_THREADS


def test_a_body_too_large_is_invalid_request(limited: LiveStack, scenario: Scenario) -> None:
    with from_source("127.0.0.9") as http:
        response = http.post(
            f"{limited.url}/o/token/",
            data={"grant_type": "refresh_token", "refresh_token": "x" * (300 * 1024)},
        )
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert _rows(event="http.request_refused", remote_addr="127.0.0.9") == 1


@pytest.fixture
def flow(client: Client, scenario: Scenario) -> OAuthFlow:
    return OAuthFlow(client, scenario)

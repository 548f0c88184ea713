"""Sessions are read from Redis and kept in the database (``config.sessions``)."""

import pytest
import redis
from django.conf import settings
from django.contrib.sessions.backends.cached_db import KEY_PREFIX
from django.core.cache import caches
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from config.sessions import CACHE_SECONDS
from tests.conftest import PASSWORD, Scenario

SESSION_TABLE = '"django_session"'


def _signed_in(scenario: Scenario) -> tuple[Client, str]:
    client = Client()
    assert client.login(username=scenario.user.username, password=PASSWORD)
    return client, client.cookies[settings.SESSION_COOKIE_NAME].value


def _session_reads(client: Client) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/approvals/")
    return response.status_code, sum(SESSION_TABLE in q["sql"] for q in queries.captured_queries)


def test_a_signed_in_page_reads_the_session_from_the_cache(scenario: Scenario) -> None:
    client, _ = _signed_in(scenario)
    assert _session_reads(client) == (200, 0)


def test_a_missing_cache_copy_is_read_from_the_database_and_kept_again(scenario: Scenario) -> None:
    client, key = _signed_in(scenario)
    caches["sessions"].delete(KEY_PREFIX + key)  # Redis restarted, or the copy aged out

    assert _session_reads(client) == (200, 1)  # still signed in: the row is the truth
    assert _session_reads(client) == (200, 0)


def test_a_cache_copy_lives_at_most_a_minute(scenario: Scenario) -> None:
    _, key = _signed_in(scenario)
    ttl = redis.Redis.from_url(settings.REDIS_URL).ttl(caches["sessions"].make_key(KEY_PREFIX + key))
    assert 0 < ttl <= CACHE_SECONDS < settings.SESSION_COOKIE_AGE


def test_signing_out_ends_the_session_in_both_places(scenario: Scenario) -> None:
    client, key = _signed_in(scenario)
    stolen = Client()
    stolen.cookies[settings.SESSION_COOKIE_NAME] = key
    assert stolen.get("/approvals/").status_code == 200

    client.post("/accounts/logout/")

    assert caches["sessions"].get(KEY_PREFIX + key) is None
    response = stolen.get("/approvals/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


@pytest.mark.parametrize("method", ["get", "set"])
def test_with_redis_unreachable_people_stay_signed_in(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    client, _ = _signed_in(scenario)
    cache = caches["sessions"]
    # Below the fail-open wrapper: what redis-py raises with Redis gone.
    client_of = type(cache._cache)  # type: ignore[attr-defined]

    def gone(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(client_of, method, gone)
    assert client.get("/approvals/").status_code == 200


def test_every_thread_shares_one_session_cache_client(scenario: Scenario) -> None:
    # Each websocket that connects loads its session; a client per thread or per async context
    # held a Redis connection per open socket.
    from concurrent.futures import ThreadPoolExecutor

    from config.sessions import SessionStore

    with ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(lambda _: SessionStore(), range(32)))
    assert len({id(store._cache) for store in stores}) == 1
    assert len({id(store._cache.cache) for store in stores}) == 1

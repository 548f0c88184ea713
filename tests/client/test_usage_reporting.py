"""The verifier reports each accepted session-token use to Countersign, off the request path."""

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from consent.models import GrantUse, ScopePolicy
from countersign import TokenVerifier, UsageReporter
from tests.conftest import OAuthFlow, Scenario
from tests.live import LiveStack, free_port

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def session_token(live: LiveStack, flow: OAuthFlow, ledger_policy: ScopePolicy) -> str:  # noqa: F811
    token: str = flow.full()["access_token"]
    flow.client.logout()
    return token


def _catalog(live: LiveStack, scenario: Scenario, **kwargs: Any) -> TokenVerifier:
    return TokenVerifier(
        live.url,
        client_id=scenario.rs_client_id,
        client_secret=scenario.rs_secret,
        audience=scenario.rs_audience,
        http=httpx.Client(timeout=10),
        report_usage=True,
        **kwargs,
    )


def _usage(verifier: TokenVerifier) -> UsageReporter:
    """The usage reporter of a verifier made with report_usage=True."""
    assert verifier.usage is not None
    return verifier.usage


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_accepted_uses_reach_the_grant_in_the_background(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    catalog = _catalog(live, scenario, usage_interval=0.2)
    try:
        started = time.monotonic()
        for _ in range(3):
            catalog.verify_session(
                session_token, required_scopes=["catalog:read"], operation="search catalog"
            )
        catalog.verify_session(
            session_token, required_scopes=["catalog:read"], htm="GET", htu="http://catalog.test/items/42?x=1"
        )
        assert time.monotonic() - started < 1.0  # nothing was sent while verifying
        assert _wait_for(lambda: GrantUse.objects.count() == 4), (
            _usage(catalog).sent,
            _usage(catalog).last_error,
        )
    finally:
        catalog.close()
    uses = list(GrantUse.objects.order_by("id").values_list("operation", "scope", "outcome"))
    assert uses[0] == ("search catalog", "catalog:read", "accepted") and uses[3][0] == "GET /items/42"
    assert _usage(catalog).sent == 4 and _usage(catalog).dropped == 0


def test_a_flood_is_bounded_and_counted(live: LiveStack, scenario: Scenario, session_token: str) -> None:
    catalog = _catalog(live, scenario, usage_queue=5, usage_interval=60)
    try:
        for _ in range(20):
            catalog.verify_session(session_token, required_scopes=["catalog:read"], operation="flood")
        assert _usage(catalog).pending == 5 and _usage(catalog).dropped == 15
        _usage(catalog).flush()
    finally:
        catalog.close()
    assert GrantUse.objects.count() == 5 and _usage(catalog).sent == 5


def test_with_countersign_down_the_resource_server_keeps_serving(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    catalog = _catalog(live, scenario, usage_interval=60)
    try:
        catalog.verify_session(session_token, required_scopes=["catalog:read"])  # keys and metadata cached
        _usage(catalog).flush()
        # From here Countersign is unreachable for reports; the cached keys still verify.
        catalog._metadata = {
            **catalog.metadata(),
            "usage_endpoint": f"http://127.0.0.1:{free_port()}/o/usage/",
        }
        for _ in range(3):
            assert catalog.verify_session(session_token, required_scopes=["catalog:read"]).subject
        _usage(catalog).flush()
        assert _usage(catalog).dropped == 3 and "ConnectError" in _usage(catalog).last_error
    finally:
        catalog.close()
    assert GrantUse.objects.count() == 1


def test_a_refused_report_is_counted_as_dropped(live: LiveStack, scenario: Scenario) -> None:
    # Credentials of no resource server: the server refuses (401), the reporter counts and goes on.
    reporter = UsageReporter(lambda: f"{live.url}/o/usage/", authorization="Basic bm9ib2R5Om5vdGhpbmc=")
    reporter.report(jti="x", scope="catalog:read", operation="probe")
    reporter.flush()
    assert reporter.dropped == 1 and reporter.last_error.startswith("HTTP 401")
    with pytest.raises(ValueError):
        TokenVerifier(live.url, audience="http://catalog.test", report_usage=True)

"""A live stack with small limits, so that tests reach them in a few requests.

Its own server processes (no Celery worker: nothing here is delivered), sharing the test
database and Redis like ``tests.live.live_stack``. Requests from another source address bind
their side of the connection to another loopback address (``from_source``): the router in front
passes the peer address on as the client's.
"""

import json
from collections.abc import Iterator
from typing import Any, TypedDict

import httpx
import pytest
from pytest_django import DjangoDbBlocker, Settings

from tests.live import LiveStack, start_stack


class RateLimit(TypedDict, total=False):
    paths: list[str]
    client: list[int]
    user: list[int]
    source: list[int]


RATE_LIMITS: dict[str, RateLimit] = {
    "protocol": {
        "paths": ["/o/token/", "/o/bc-authorize/", "/o/redeem/", "/o/introspect/", "/o/revoke/"],
        "client": [100, 60],
        "source": [2000, 60],
    },
    "pages": {
        "paths": ["/accounts/", "/approvals/", "/grants/", "/activity/", "/o/authorize/", "/admin/"],
        "user": [20, 60],
        "source": [2000, 60],
    },
    "public": {"paths": ["/.well-known/", "/o/agents/"], "source": [2000, 60]},
}
ATTEMPT_LIMITS = {
    "client": {"account": 8, "source": 4, "seconds": 300},
    "resource_server": {"account": 8, "source": 4, "seconds": 300},
    "fresh_auth": {"account": 3, "source": 10, "seconds": 900},
    "totp": {"account": 3, "source": 10, "seconds": 900},
    "login": {"account": 3, "source": 3, "seconds": 900},
}


@pytest.fixture(scope="module")
def limited_stack(
    django_db_setup: None, django_db_blocker: DjangoDbBlocker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    env = {
        "COUNTERSIGN_RATE_LIMITS": json.dumps(RATE_LIMITS),
        "COUNTERSIGN_ATTEMPT_LIMITS": json.dumps(ATTEMPT_LIMITS),
        "COUNTERSIGN_LOCKOUT_SECONDS": "120",
    }
    with django_db_blocker.unblock():
        with start_stack(tmp_path_factory.mktemp("limited"), extra_env=env, worker=False) as stack:
            yield stack


@pytest.fixture
def limited(limited_stack: LiveStack, transactional_db: None, settings: Settings) -> LiveStack:
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "ISSUER": limited_stack.url,
        "RATE_LIMITS": RATE_LIMITS,
        "ATTEMPT_LIMITS": ATTEMPT_LIMITS,
        "LOCKOUT_SECONDS": 120,
    }
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": limited_stack.url}
    return limited_stack


def from_source(address: str, **kwargs: Any) -> httpx.Client:
    """An HTTP client whose connections come from ``address`` (a loopback address: 127.0.0.2, ...)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10, **kwargs)


def refusals() -> dict[str, int]:
    from consent.limits.store import refused_counts

    return refused_counts()

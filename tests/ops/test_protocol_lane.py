"""The protocol lane (``config.middleware.ProtocolLaneMiddleware``) answers exactly as the full chain does."""

import gc
import io
import json
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode
from wsgiref.types import WSGIApplication

import pytest
from django.conf import settings
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.test import Client, RequestFactory, override_settings

from config.middleware import LANE_PATHS, ProtocolLaneMiddleware
from config.wsgi import pooled
from consent import rows
from tests.conftest import REDIRECT_URI, ClientResponse, OAuthFlow, Scenario, basic, pkce_pair

LANE = "config.middleware.ProtocolLaneMiddleware"
FORM = "application/x-www-form-urlencoded"


def _full_chain() -> list[str]:
    return [m for m in settings.MIDDLEWARE if m != LANE]


def _shape(response: "HttpResponse | ClientResponse") -> tuple[object, ...]:
    """What a client sees, minus what differs per request (the request id, token values)."""
    headers = {k: v for k, v in response.headers.items() if k != "X-Request-ID"}
    body: object = response.content
    if headers.get("Content-Type") == "application/json":
        parsed = json.loads(response.content)
        body = {
            k: (
                v
                if k in ("error", "error_description", "token_type", "scope", "active")
                else type(v).__name__
            )
            for k, v in parsed.items()
        }
        headers.pop("Content-Length", None)  # token values differ in length
    return response.status_code, headers, body, bool(response.get("X-Request-ID"))


def _post(client: Client, path: str, data: dict[str, str], **extra: Any) -> ClientResponse:
    return client.post(path, urlencode(data), content_type=FORM, **extra)


def test_every_lane_path_is_answered_without_the_rest_of_the_chain(scenario: Scenario) -> None:
    def rest_of_chain(request: HttpRequest) -> HttpResponseBase:
        raise AssertionError(f"{request.path} went down the full chain")

    lane = ProtocolLaneMiddleware(rest_of_chain)
    factory = RequestFactory()
    for path in LANE_PATHS:
        response = lane(factory.post(path, "", content_type=FORM))
        assert isinstance(response, HttpResponse)
        assert 400 <= response.status_code < 500, (path, response.content)
        assert response["X-Frame-Options"] == "DENY" and response["X-Request-ID"]


def test_other_requests_go_down_the_full_chain(scenario: Scenario) -> None:
    seen: list[str] = []
    full = HttpResponse("full")

    def rest_of_chain(request: HttpRequest) -> HttpResponse:
        seen.append(request.path)
        return full

    lane = ProtocolLaneMiddleware(rest_of_chain)
    factory = RequestFactory()
    assert lane(factory.get("/o/token/")) is full  # only POSTs take the lane
    assert lane(factory.post("/o/authorize/", {})) is full  # the consent page needs the session
    assert lane(factory.post("/o/token", "", content_type=FORM)) is full  # CommonMiddleware's redirect
    assert seen == ["/o/token/", "/o/authorize/", "/o/token"]


REFUSALS = [
    ("/o/token/", {}, {}),
    ("/o/token/", {"grant_type": "password"}, {"agent": True}),
    (
        "/o/token/",
        {"grant_type": "authorization_code", "code": "nope", "code_verifier": "x" * 43},
        {"agent": True},
    ),
    ("/o/token/", {"grant_type": "authorization_code", "code": "nope"}, {"wrong": True}),
    ("/o/bc-authorize/", {"scope": "ledger:write"}, {"agent": True}),
    ("/o/redeem/", {"token": "not-a-jwt"}, {"rs": True}),
    ("/o/redeem/", {"token": "x"}, {}),
    ("/o/introspect/", {"token": "x"}, {"rs": True}),
    ("/o/introspect/", {"token": "x"}, {"wrong": True}),
    ("/o/revoke/", {"token": "x"}, {"agent": True}),
]


def _credentials(scenario: Scenario, who: dict[str, bool]) -> dict[str, str]:
    """The Authorization header a REFUSALS row presents, as WSGI environ keys."""
    if who.get("agent"):
        return {"HTTP_AUTHORIZATION": basic(scenario.agent.client_id, scenario.agent_secret)}
    if who.get("rs"):
        return {"HTTP_AUTHORIZATION": basic(scenario.rs_client_id, scenario.rs_secret)}
    if who.get("wrong"):
        return {"HTTP_AUTHORIZATION": basic(scenario.agent.client_id, "wrong")}
    return {}


@pytest.mark.parametrize(("path", "data", "who"), REFUSALS)
def test_refusals_are_the_same_through_the_lane_and_the_full_chain(
    scenario: Scenario, path: str, data: dict[str, str], who: dict[str, bool]
) -> None:
    extra = _credentials(scenario, who)
    lane = _shape(_post(Client(), path, data, **extra))
    with override_settings(MIDDLEWARE=_full_chain()):
        full = _shape(_post(Client(), path, data, **extra))
    assert lane == full


def test_a_token_response_is_the_same_through_the_lane_and_the_full_chain(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    def exchange(client: Client) -> ClientResponse:
        flow.client = client
        flow.login()
        verifier, challenge = pkce_pair()
        code = flow.code_from(flow.consent(flow.authorize_query(scope="catalog:read", challenge=challenge)))
        return flow.token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
            }
        )

    lane = exchange(Client())
    with override_settings(MIDDLEWARE=_full_chain()):
        full = exchange(Client())
    assert lane.status_code == 200
    assert _shape(lane) == _shape(full)
    token = lane.json()["access_token"]
    introspected = flow.introspect(token)
    with override_settings(MIDDLEWARE=_full_chain()):
        flow.client = Client()
        assert _shape(flow.introspect(token)) == _shape(introspected)
    assert introspected.json()["active"] is True


def _wsgi(app: WSGIApplication, path: str, data: dict[str, str], **extra: str) -> HttpResponse:
    """One POST through a WSGI callable, the way granian calls it; the answer as a response."""
    body = urlencode(data).encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": FORM,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        **extra,
    }
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]:
        started.append((status, headers))
        return lambda data: None  # the lane never writes through it

    chunks = app(environ, start_response)
    try:
        content = b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    ((status, headers),) = started
    response = HttpResponse(content, status=int(status.split()[0]))
    for name, value in headers:
        response[name] = value
    return response


@pytest.fixture
def signals_sent() -> Iterator[list[str]]:
    sent: list[str] = []

    def started(**kwargs: object) -> None:
        sent.append("request_started")

    def finished(**kwargs: object) -> None:
        sent.append("request_finished")

    request_started.connect(started)
    request_finished.connect(finished)
    yield sent
    request_started.disconnect(started)
    request_finished.disconnect(finished)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("path", "data", "who"), REFUSALS)
def test_the_wsgi_lane_answers_as_django_s_handler_without_its_request_cycle(
    scenario: Scenario, signals_sent: list[str], path: str, data: dict[str, str], who: dict[str, bool]
) -> None:
    from config.wsgi import application

    extra = _credentials(scenario, who)
    lane = _wsgi(application, path, data, **extra)
    assert signals_sent == []  # Django's request cycle was not run
    full = _wsgi(get_wsgi_application(), path, data, **extra)
    assert signals_sent == ["request_started", "request_finished"]
    assert _shape(lane) == _shape(full)
    assert lane["X-Content-Type-Options"] == "nosniff"  # SecurityMiddleware still runs on the lane
    assert connection.connection is None  # the connection went back to the pool, as after any request


@pytest.mark.django_db(transaction=True)
def test_the_wsgi_lane_hands_everything_else_to_django(scenario: Scenario, signals_sent: list[str]) -> None:
    from config.wsgi import application

    _wsgi(application, "/o/token", {})  # no slash: CommonMiddleware's answer, not the lane's
    _wsgi(application, "/o/token/", {}, SCRIPT_NAME="/auth")
    assert signals_sent == ["request_started", "request_finished"] * 2


def _lane_token_request(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch, grant: Callable[..., object]
) -> HttpResponse:
    """A client_credentials POST through the WSGI lane, answered by ``grant`` in place of every grant."""
    from config.wsgi import application
    from consent.views import token as token_view

    monkeypatch.setattr(token_view, "token_grants", lambda: {"client_credentials": grant})
    return _wsgi(
        application,
        "/o/token/",
        {"grant_type": "client_credentials"},
        HTTP_AUTHORIZATION=basic(scenario.agent.client_id, scenario.agent_secret),
    )


@pytest.mark.django_db(transaction=True)
def test_a_database_error_on_the_wsgi_lane_is_a_503_and_the_connection_is_dropped(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: object, **kwargs: object) -> None:
        raise OperationalError("server closed the connection unexpectedly")

    response = _lane_token_request(scenario, monkeypatch, down)
    assert response.status_code == 503
    assert json.loads(response.content)["error"] == "temporarily_unavailable"
    assert connection.connection is None
    assert rows.bind(None) is None  # the request's connection was unbound on the way out


@pytest.mark.django_db(transaction=True)
def test_the_wsgi_lane_binds_the_thread_s_connection_for_the_request_only(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane looks the connection up once and binds it: the view's statements get that wrapper
    (``rows.db()``) without looking it up again, and it is unbound when the request ends."""
    seen: list[object] = []

    def recorded(*args: object, **kwargs: object) -> dict[str, object]:
        bound = rows.bind(None)  # what the lane bound (put back at once)
        rows.bind(bound)
        seen.append(bound)
        return {"access_token": "t", "token_type": "Bearer", "expires_in": 60}

    assert rows.bind(None) is None
    response = _lane_token_request(scenario, monkeypatch, recorded)
    assert response.status_code == 200
    assert seen == [connections[DEFAULT_DB_ALIAS]]
    assert rows.bind(None) is None  # nothing left bound for the thread's next request


def _in_a_thread_of_its_own(work: Callable[[], None]) -> None:
    """Run ``work`` on a thread that then ends, as granian retires an idle blocking thread."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported on the test's thread
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and not failed, failed
    gc.collect()


@pytest.mark.skipif(not pooled(connection), reason="connections are kept only from PostgreSQL's pool")
@pytest.mark.django_db(transaction=True)
def test_a_lane_thread_keeps_its_pooled_connection_and_hands_it_back_when_the_thread_ends(
    scenario: Scenario,
) -> None:
    from config.wsgi import application

    pool = connection.pool  # type: ignore[attr-defined]  # PostgreSQL's wrapper

    def taken_out() -> int:  # connections the pool counts as its own but has not in hand
        stats = pool.get_stats()
        return int(stats["pool_size"] - stats["pool_available"])

    before = taken_out()
    held: list[object] = []

    def two_requests() -> None:
        for _ in range(2):
            response = _wsgi(application, "/o/token/", {"grant_type": "password"})
            assert response.status_code == 400  # audited refusal: the request wrote its row
            held.append(connections[DEFAULT_DB_ALIAS].connection)

    _in_a_thread_of_its_own(two_requests)
    assert held[0] is not None and held[0] is held[1]  # the second request took no connection from the pool
    assert taken_out() == before  # back in the pool, not lost with the thread


@pytest.mark.skipif(not pooled(connection), reason="connections are kept only from PostgreSQL's pool")
@pytest.mark.django_db(transaction=True)
def test_a_kept_connection_goes_back_after_its_time_or_a_page_request(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    import config.wsgi
    from config.wsgi import application

    after: dict[str, object] = {}

    def requests() -> None:
        conn = connections[DEFAULT_DB_ALIAS]
        _wsgi(application, "/o/token/", {"grant_type": "password"})
        assert conn.connection is not None
        _wsgi(application, "/healthz", {})  # a request through Django's handler returns it as ever
        after["page"] = conn.connection
        monkeypatch.setattr(config.wsgi, "LANE_CONNECTION_KEEP", 0.0)
        _wsgi(application, "/o/token/", {"grant_type": "password"})
        after["expired"] = conn.connection

    _in_a_thread_of_its_own(requests)
    assert after == {"page": None, "expired": None}


@pytest.mark.django_db(transaction=True)
@override_settings(
    SECURE_SSL_REDIRECT=True,
    SECURE_HSTS_SECONDS=3600,
    SECURE_HSTS_PRELOAD=True,
    SECURE_REFERRER_POLICY="no-referrer,strict-origin",
)
def test_the_wsgi_lane_redirects_and_sets_security_headers_as_security_middleware_does(
    scenario: Scenario,
) -> None:
    from config.wsgi import ProtocolLane

    lane, full = ProtocolLane(get_wsgi_application()), get_wsgi_application()
    data = {"grant_type": "client_credentials"}
    auth = {"HTTP_AUTHORIZATION": basic(scenario.agent.client_id, "wrong")}
    plain = _wsgi(lane, "/o/token/", data, **auth)
    assert plain.status_code == 301 and plain["Location"].startswith("https://")
    assert _shape(plain) == _shape(_wsgi(full, "/o/token/", data, **auth))
    secure = _wsgi(lane, "/o/token/", data, **auth, **{"wsgi.url_scheme": "https"})
    assert 400 <= secure.status_code < 500  # refused by the view, with the headers of any response
    assert secure["Strict-Transport-Security"] == "max-age=3600; preload"
    assert secure["Referrer-Policy"] == "no-referrer,strict-origin"
    assert _shape(secure) == _shape(_wsgi(full, "/o/token/", data, **auth, **{"wsgi.url_scheme": "https"}))

"""WSGI entry point: every HTTP request (pages and protocol endpoints), served by granian.

Django's WSGI handler runs a request start to finish on one thread; the ASGI handler hops
between threads several times per request (docs/deployment.md), so HTTP is served here and
only websockets go through ``config.asgi``. The protocol endpoints' POSTs skip even the WSGI
handler's request cycle (``ProtocolLane``).

Behind the proxy the peer is the proxy: ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are
believed only from ``FORWARDED_ALLOW_IPS`` (comma-separated, default ``127.0.0.1``, ``*`` for
any), the rule uvicorn applies to the websocket processes, so both see the same client address.
"""

import io
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import cast
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.conf import settings  # noqa: E402
from django.core.handlers.wsgi import WSGIRequest  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections  # noqa: E402
from django.db.backends.base.base import BaseDatabaseWrapper  # noqa: E402
from django.http import HttpRequest  # noqa: E402
from django.http.response import HttpResponse, HttpResponseBase  # noqa: E402
from django.middleware.security import SecurityMiddleware  # noqa: E402
from django.utils.module_loading import import_string  # noqa: E402

LANE_MIDDLEWARE = "config.middleware.ProtocolLaneMiddleware"
SECURITY_MIDDLEWARE = "django.middleware.security.SecurityMiddleware"
# How long (seconds) a lane thread may keep its pooled database connection from one request to
# the next, instead of handing it back to the pool and taking one again on every request.
LANE_CONNECTION_KEEP = float(os.environ.get("LANE_CONNECTION_KEEP", "30"))


class ChunkedBody:
    """Give a chunked request body a length, as Django's WSGI request needs one to read a body.

    Django's ASGI handler reads whatever body arrives; under WSGI, without ``CONTENT_LENGTH`` the
    body would be silently empty. Bounded by ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (413 beyond it).
    """

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if (
            not environ.get("CONTENT_LENGTH")
            and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        ):
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 2_621_440
            body = environ["wsgi.input"].read(limit + 1)
            if len(body) > limit:
                start_response(
                    "413 Content Too Large", [("Content-Type", "text/plain"), ("Connection", "close")]
                )
                return [b"Request body too large."]
            environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
        return self.app(environ, start_response)


class KeptConnection:
    """A pooled connection a lane thread holds between two requests, handed back should the thread end.

    granian retires a blocking thread that has been idle for a while (``--blocking-threads-idle-timeout``),
    and Django's connection for that thread goes with it; a connection taken from the pool and never
    returned would be lost to the pool for good. This object lives in the thread's own storage beside
    it: when the thread ends while it is armed and Django still holds the same connection, it puts
    the connection back. Disarmed while a request runs (Django returns the connection as usual then,
    e.g. when a page request on the same thread closes it).
    """

    def __init__(self, wrapper: BaseDatabaseWrapper, until: float) -> None:
        self.wrapper, self.pooled, self.until = wrapper, wrapper.connection, until
        self.armed = False  # armed by the lane once the request that took the connection has ended

    def __del__(self) -> None:
        pool = getattr(self.pooled, "_pool", None)
        if not self.armed or pool is None or self.wrapper.connection is not self.pooled:
            return
        try:
            self.wrapper.connection = None
            pool.putconn(self.pooled)
        except Exception:  # noqa: BLE001 - a finalizer must not raise; the pool then opens a new one
            pass


def pooled(wrapper: BaseDatabaseWrapper) -> bool:
    """Whether ``wrapper``'s connections come from PostgreSQL's pool (the only ones a lane thread keeps)."""
    return wrapper.vendor == "postgresql" and bool(wrapper.settings_dict.get("OPTIONS", {}).get("pool"))


class _Probe(HttpRequest):
    """A request that is secure or not: what ``SecurityMiddleware.process_response`` looks at."""

    def __init__(self, secure: bool) -> None:
        super().__init__()
        self.secure = secure

    def is_secure(self) -> bool:
        return self.secure


class ProtocolLane:
    """POSTs to the protocol endpoints answered without Django's per-request cycle around them.

    ``config.middleware.ProtocolLaneMiddleware`` already runs only what a token, CIBA,
    redemption, introspection or revocation POST needs. Around it, Django's WSGI handler still
    does, per request: the ``request_started`` and ``request_finished`` signals (each closing
    every database connection and cache, resetting the URLconf), its middleware adapter and the
    response's own close; measured by py-spy on a web process serving code exchanges, about a
    tenth of the process's CPU (docs/deployment.md). Here the same lane handlers run behind the
    middleware listed before the lane in ``MIDDLEWARE`` (``SecurityMiddleware``: its redirect
    and headers), the database connection is kept for the thread's next lane request or goes back
    to its pool as ``request_finished`` would (below), and the body is handed over as bytes.

    The same answer either way (``tests/ops/test_protocol_lane.py`` drives both). Every other
    request, and every request under a ``SCRIPT_NAME`` prefix, goes to Django's handler.

    With PostgreSQL's connection pool, a lane thread keeps its connection for the next request
    (up to ``LANE_CONNECTION_KEEP`` seconds, then hands it back): taking it from the pool and
    returning it cost ~60 µs of every request (5 % of a code exchange's instructions, measured by
    ``bench/inprocess.py --instructions``). Only a clean connection is kept: in autocommit, no
    transaction open, no error seen; anything else goes back as ``request_finished`` would.

    When ``SecurityMiddleware`` is all that comes before the lane (the shipped settings), its
    redirect runs as ever but its response headers, the same for every response (``nosniff``,
    the referrer and opener policies, HSTS on a secure request), are learned from it once and
    written straight into the WSGI header list with ``X-Frame-Options`` and ``Content-Length``,
    instead of through Django's header validation on every request (~2 % of a code exchange).
    """

    def __init__(self, app: WSGIApplication) -> None:
        from config.middleware import finish_lane_response, lane_handlers
        from consent.rows import bind

        self.app = app
        self.finish = finish_lane_response
        self.bind = bind
        self.lanes: dict[str, Callable[[HttpRequest], HttpResponseBase]] = {}
        if LANE_MIDDLEWARE not in settings.MIDDLEWARE or settings.FORCE_SCRIPT_NAME:
            return
        outer = settings.MIDDLEWARE[: settings.MIDDLEWARE.index(LANE_MIDDLEWARE)]

        def unused(request: HttpRequest) -> HttpResponseBase:
            raise AssertionError("a lane answers every request it takes")

        self.security: SecurityMiddleware | None = None
        if outer == [SECURITY_MIDDLEWARE]:
            self.security, outer = SecurityMiddleware(unused), []
            self.added = {secure: self._added_headers(self.security, secure) for secure in (False, True)}
        for path, handler in lane_handlers(unused).items():
            for name in reversed(outer):
                handler = import_string(name)(handler)
            self.lanes[path] = handler
        self.kept = threading.local()

    def _added_headers(self, security: SecurityMiddleware, secure: bool) -> list[tuple[str, str]]:
        """The headers ``SecurityMiddleware`` and ``finish_lane_response`` add to any response."""
        blank = HttpResponse()
        added = self.finish(security.process_response(_Probe(secure), HttpResponse()))
        return [(k, v) for k, v in added.items() if k not in blank.headers and k != "Content-Length"]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        lane = (
            self.lanes.get(environ.get("PATH_INFO", "")) if environ.get("REQUEST_METHOD") == "POST" else None
        )
        if lane is None or environ.get("SCRIPT_NAME"):
            return self.app(environ, start_response)
        conn = connections[DEFAULT_DB_ALIAS]  # once: rows.db() hands it on for the request
        kept: KeptConnection | None = getattr(self.kept, "connection", None)
        if kept is not None:
            kept.armed = False  # the request uses the connection as any other would
            if conn.connection is not kept.pooled:
                kept = None  # handed back meanwhile (a page request on this thread): its time is over
        response: HttpResponseBase | None = None
        request = WSGIRequest(environ)
        security, redirect = self.security, None
        outer = self.bind(conn)
        try:
            if security is None:
                response = self.finish(lane(request))
            elif security.redirect and (redirect := security.process_request(request)) is not None:
                response = security.process_response(request, redirect)  # as the full chain answers it
            else:
                response = lane(request)
        finally:
            self.bind(outer)
            # A 5xx (the 503 of a database outage among them) hands the connection back.
            clean = response is not None and response.status_code < 500
            self.kept.connection = self._keep_or_release(conn, kept, clean=clean)
        headers = [
            *response.items(),
            *(("Set-Cookie", c.output(header="")) for c in response.cookies.values()),
        ]
        if security is not None and redirect is None:
            present = response.headers
            for name, value in self.added[bool(security.sts_seconds) and request.is_secure()]:
                if name not in present:
                    headers.append((name, value))
            if not response.streaming and "Content-Length" not in present:
                headers.append(("Content-Length", str(len(cast(HttpResponse, response).content))))
        start_response(f"{response.status_code} {response.reason_phrase}", headers)
        if response.streaming:  # none of the lane's views streams; its close sends the signal as usual
            return cast(Iterable[bytes], response)
        return [cast(HttpResponse, response).content]

    @staticmethod
    def _keep_or_release(
        conn: BaseDatabaseWrapper, kept: KeptConnection | None, *, clean: bool
    ) -> KeptConnection | None:
        """Keep the thread's connection (``conn``) for its next request, or return it as ``request_finished`` would."""
        now = time.monotonic()
        if (
            clean
            and conn.connection is not None
            and pooled(conn)
            and not conn.errors_occurred
            and not conn.in_atomic_block
            and conn.get_autocommit()
        ):
            if kept is None or kept.pooled is not conn.connection:
                kept = KeptConnection(conn, now + LANE_CONNECTION_KEEP)
            if now < kept.until:
                conn.health_check_done = False  # type: ignore[attr-defined]  # CONN_HEALTH_CHECKS: once per request
                kept.armed = True
                return kept
        close_old_connections()
        return None


class ProxyHeaders:
    """Set ``REMOTE_ADDR`` and ``wsgi.url_scheme`` from a trusted proxy's forwarding headers."""

    def __init__(self, app: WSGIApplication, trusted: str) -> None:
        self.app = app
        self.trusted = {h.strip() for h in trusted.split(",") if h.strip()}
        self.always = "*" in self.trusted

    def _trusted(self, host: str) -> bool:
        return self.always or host in self.trusted

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._trusted(environ.get("REMOTE_ADDR", "")):
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                environ["wsgi.url_scheme"] = proto
            forwarded = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
            if forwarded:
                # The nearest hop that is not one of our proxies is the client; earlier entries are
                # whatever the client chose to send.
                environ["REMOTE_ADDR"] = next(
                    (h for h in reversed(forwarded) if not self._trusted(h)), forwarded[0]
                )
        return self.app(environ, start_response)


application = ProxyHeaders(
    ChunkedBody(ProtocolLane(get_wsgi_application())), os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
)

"""WSGI entry point: every HTTP request (pages and protocol endpoints), served by granian.

Django's WSGI handler runs a request start to finish on one thread; the ASGI handler hops
between threads several times per request (docs/deployment.md), so HTTP is served here and
only websockets go through ``config.asgi``.

Behind the proxy the peer is the proxy: ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are
believed only from ``FORWARDED_ALLOW_IPS`` (comma-separated, default ``127.0.0.1``, ``*`` for
any), the rule uvicorn applies to the websocket processes, so both see the same client address.
"""

import io
import os
from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.conf import settings  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402


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
    ChunkedBody(get_wsgi_application()), os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
)

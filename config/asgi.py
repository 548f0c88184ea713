"""ASGI entry point: HTTP through Django, websockets through Channels.

Websocket connections are Origin-checked against ALLOWED_HOSTS and
session-authenticated before any consumer sees them; every refused handshake is
audited (one row per reason and source a minute, the rest counted: consent.limits.websocket).
"""

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402
from asgiref.sync import sync_to_async  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.http.response import HttpResponseBase, StreamingHttpResponse  # noqa: E402


async def _chunks(iterator: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A synchronous streaming body (WhiteNoise's static files are FileResponses) read off the event
    loop, one chunk at a time."""
    it = iter(iterator)
    done = object()
    # next(it, default): the stubs of sync_to_async keep only next's one-argument form.
    while (chunk := await sync_to_async(next, thread_sensitive=False)(it, done)) is not done:  # type: ignore[call-arg]
        yield chunk


class _ASGIHandler(ASGIHandler):
    """Django's handler, serving synchronous streaming bodies as asynchronous ones: Django warns
    ("StreamingHttpResponse must consume synchronous iterators...") for every static file otherwise."""

    async def send_response(
        self, response: HttpResponseBase, send: Callable[[Mapping[str, Any]], Awaitable[None]]
    ) -> None:
        if response.streaming and not (streaming := cast(StreamingHttpResponse, response)).is_async:
            # Not async: its content is a synchronous iterator of bytes.
            streaming.streaming_content = _chunks(cast(Iterable[bytes], streaming.streaming_content))
        return await super().send_response(response, send)


django.setup(set_prefix=False)  # what django.core.asgi.get_asgi_application does before building the handler
django_asgi_app = _ASGIHandler()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.routing import websocket_urlpatterns  # noqa: E402
from consent.limits.websocket import origin_validated  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # URLRouter takes Django's path() entries (routing.py); its stubs want Channels' own kind.
        "websocket": origin_validated(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),  # type: ignore[arg-type]
    }
)

"""ASGI entry point: HTTP through Django, websockets through Channels.

Websocket connections are Origin-checked against ALLOWED_HOSTS and
session-authenticated before any consumer sees them; every refused handshake is
audited (one row per reason and source a minute, the rest counted: consent.limits.websocket).
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.routing import websocket_urlpatterns  # noqa: E402
from consent.limits.websocket import origin_validated  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": origin_validated(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

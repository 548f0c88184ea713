"""Websocket routes. Each app that pushes to browsers adds its consumers here."""

from approvals.routing import websocket_urlpatterns as approvals_ws

websocket_urlpatterns = [*approvals_ws]

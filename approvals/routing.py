from django.urls import path

from .consumers import ApprovalsConsumer

# Channels routes ASGI applications with Django's path(); django-stubs types it for views only.
websocket_urlpatterns = [path("ws/approvals/", ApprovalsConsumer.as_asgi())]  # type: ignore[arg-type]

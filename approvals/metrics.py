"""What the inbox's websocket side counts, for ``/metrics`` (``config.health``)."""

from prometheus_client import Gauge

# Per process: each websocket process serves its own; the scrape of every process adds them up.
websocket_connections = Gauge(
    "countersign_websocket_connections", "Open inbox websockets in this process", registry=None
)

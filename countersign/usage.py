"""Reporting accepted session-token uses back to Countersign, off the request path.

:class:`UsageReporter` keeps a bounded in-memory queue; a background thread sends it in
batches to the issuer's ``usage_endpoint`` (advertised in its RFC 8414 metadata), with the
resource server's own credentials (HTTP Basic, as for RFC 7662 §2.1 introspection). Nothing
here ever blocks or fails a request being served: a full queue drops the new report, an
unreachable Countersign drops the batch, and both are counted (``dropped``).
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

MAX_BATCH = 100  # the server's own limit per report
OPERATION_MAX = 80


class UsageReporter:
    """Queue uses with :meth:`report`; they are sent every ``interval`` seconds or once
    ``batch_size`` are waiting. ``max_queue`` bounds memory whatever the traffic."""

    def __init__(
        self,
        endpoint: Callable[[], str],
        *,
        authorization: str,
        http: httpx.Client | None = None,
        max_queue: int = 10_000,
        batch_size: int = MAX_BATCH,
        interval: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        self._endpoint = endpoint
        self._authorization = authorization
        self._http = http or httpx.Client(timeout=timeout, follow_redirects=False)
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max_queue)
        self.batch_size = batch_size
        self.interval = interval
        self.sent = 0  # uses the server accepted (duplicates included)
        self.dropped = 0  # uses lost: queue full, server unreachable, or refused
        self.last_error = ""
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def report(self, *, jti: str, scope: str, operation: str = "", outcome: str = "accepted") -> bool:
        """Queue one use; never blocks. False (and counted in ``dropped``) if the queue is full."""
        use = {
            "id": secrets.token_urlsafe(12),
            "jti": jti,
            "scope": scope,
            "operation": "".join(c for c in operation if c.isprintable())[:OPERATION_MAX],
            "outcome": outcome,
            "at": round(time.time(), 3),
        }
        try:
            self._queue.put_nowait(use)
        except queue.Full:
            self.dropped += 1
            return False
        self._ensure_thread()
        if self._queue.qsize() >= self.batch_size:
            self._wake.set()
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="countersign-usage", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def _take(self) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def flush(self) -> None:
        """Send everything queued now (the background thread calls this; so may tests and shutdown)."""
        while True:
            batch = self._take()
            if not batch:
                return
            self._send(batch)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        try:
            response = self._http.post(
                self._endpoint(),
                json={"uses": batch},
                headers={"Authorization": self._authorization, "Accept": "application/json"},
            )
        except Exception as exc:  # noqa: BLE001  (Countersign down, metadata unreachable: never the caller's problem)
            self.dropped += len(batch)
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            return
        if response.status_code == 200:
            self.sent += len(batch)
        else:
            self.dropped += len(batch)
            self.last_error = f"HTTP {response.status_code}: {response.text[:160]}"

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

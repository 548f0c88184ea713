"""What the browser inbox receives, in order: prompt payloads, the user's group, its sequence.

Groups are named from the server-side user id only, never from client input.

Ordering. channels_redis drops a message when a channel is over capacity and says so only in
its own log, so the inbox cannot trust the stream to be complete. Every message pushed to a
user's group carries ``seq``, the next value of a per-user counter, and every snapshot carries
the counter's value when it was taken. An inbox applies ``seq == last + 1``, ignores
``seq <= last`` (already covered by a later snapshot), and on a jump re-reads the database
(``resync``). A drop of the newest message shows no jump, so every few seconds the inbox also
sends its last ``seq`` (``check``) and gets a snapshot back if the counter has moved.

The counter is a Redis INCR on a key beside the user's group (same shard), done by the sender
just before the group send:

- it is atomic across every worker and node, costs one round trip on the pool the send uses
  anyway, and adds no database write or row lock to a delivery (a DB counter would serialise
  every delivery for one user on one row, in the transaction-free path of a Celery task);
- it does not need to be durable: it says "something was sent", not what. If Redis loses it,
  the counter restarts and every open inbox sees a mismatch on its next check and resyncs; the
  database stays the only record of what is pending.
- a snapshot reads the counter *before* the database. A delivery commits its row before its
  INCR, so a snapshot at ``seq = n`` includes everything sent with ``seq <= n``.

The worker's sends run on one long-lived event loop per process (a daemon thread, started lazily
after Celery forks its children), so the channel layer's connection pool for that loop is reused
by every send instead of being built, used once and closed, as ``async_to_sync`` does per call.
"""

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer
from django.utils import timezone
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from consent.instances import short_instance

from .channel_layer import InboxChannelLayer
from .models import ApprovalRequest
from .wording import approve_gives, status_words

log = logging.getLogger(__name__)
T = TypeVar("T")

SEND_TIMEOUT = 5.0
# A push from the process that committed the change waits at most this long before handing the
# news to the Celery task instead (``push_now``): a request is not held up by a slow Redis.
DIRECT_SEND_TIMEOUT = 1.0
# Keys do not pile up for users nobody pushes to: after a quiet day the counter starts again at 0,
# which an open inbox notices as a mismatch on its next check.
SEQUENCE_TTL = 86400


def user_group(user_id: Any) -> str:
    return f"approvals.user.{int(user_id)}"


def prompt_payload(approval: ApprovalRequest) -> dict[str, Any]:
    """Everything the inbox shows. Agent text is sent as text; the page inserts it with textContent."""
    return {
        "id": str(approval.pk),
        # Which instance of the agent asks, when it runs as several: "Procurement Agent (instance 3f9c…)".
        "agent": f"{approval.agent.name} (instance {short_instance(approval.instance)})"
        if approval.instance
        else approval.agent.name,
        "publisher": approval.agent.publisher,
        "scope": approval.scope,
        "headline": approval.headline,
        "authorization_details": approval.authorization_details,
        "binding_message": approval.binding_message,
        "budget_note": approval.budget_note,
        "gives": approve_gives(approval.scope),
        "created": approval.created.isoformat(),
        "expires_at": approval.expires_at.isoformat(),
        "expires_in": max(0, int((approval.expires_at - timezone.now()).total_seconds())),
    }


def removal_message(approval_id: Any, status: str) -> dict[str, Any]:
    """The news that a prompt left the pending list (decided, expired, cancelled, redeemed)."""
    return {
        "type": "approval.remove",
        "id": str(approval_id),
        "status": status,
        "label": status_words(status),
    }


# --- the per-user sequence (Redis, beside the group) ----------------------------------------------


def _sequence_connection(layer: RedisChannelLayer, group: str) -> tuple[Redis, str]:
    return layer.connection(layer.consistent_hash(group)), f"{layer.prefix}:seq:{group}"


async def sequence_next(layer: RedisChannelLayer, group: str) -> int:
    connection, key = _sequence_connection(layer, group)
    async with connection.pipeline(transaction=True) as pipe:
        # A pipeline's commands return the pipeline (chained); the stubs type them as the replies.
        seq, _ = await pipe.incr(key).expire(key, SEQUENCE_TTL).execute()  # type: ignore[attr-defined]
    return int(seq)


async def sequence_current(layer: RedisChannelLayer, group: str) -> int:
    connection, key = _sequence_connection(layer, group)
    value = await connection.get(key)
    return int(value) if value is not None else 0


def client_frame(message: dict[str, Any], seq: int) -> str:
    """The text frame an inbox receives for ``message`` numbered ``seq`` (see inbox.js)."""
    if message["type"] == "approval.upsert":
        frame = {"type": "upsert", "seq": seq, "prompt": message["prompt"]}
    elif message["type"] == "grant.changed":
        frame = {"type": "grant", "seq": seq, "grant_id": message["grant_id"]}
    elif message["type"] == "approval.remove":
        frame = {
            "type": "remove",
            "seq": seq,
            "id": message["id"],
            "status": message["status"],
            "label": message.get("label", ""),
        }
    else:
        raise ValueError(f"not an inbox message: {message['type']!r}")
    return json.dumps(frame, separators=(",", ":"))


def _numbered(message: dict[str, Any]) -> Callable[[int], dict[str, Any]]:
    """What the group gets as message number ``seq``: its type, the number, the inbox's frame."""

    def build(seq: int) -> dict[str, Any]:
        return {"type": message["type"], "seq": seq, "text": client_frame(message, seq)}

    return build


async def group_send_sequenced(layer: RedisChannelLayer, group: str, message: dict[str, Any]) -> int:
    """Number ``message`` and send it to the group as the frame every inbox gets.

    The frame is encoded here, once, rather than by each of the user's open sockets. On the
    inbox's own layer numbering and sending take two round trips to Redis
    (``InboxChannelLayer.group_send_numbered``); any other Redis layer gets the INCR and a
    ``group_send``.
    """

    build = _numbered(message)
    if hasattr(layer, "group_send_numbered"):
        numbered: int = await layer.group_send_numbered(group, build, sequence_ttl=SEQUENCE_TTL)
        return numbered
    seq = await sequence_next(layer, group)
    await layer.group_send(group, build(seq))
    return seq


# --- one event loop per worker process for the sends ----------------------------------------------


class _SenderLoop:
    """An event loop in a daemon thread, created on first use in the process that uses it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        # A forked child inherits the parent's object but not its thread: start its own.
        if self._loop is None or self._pid != os.getpid():
            with self._lock:
                if self._loop is None or self._pid != os.getpid():
                    loop = asyncio.new_event_loop()
                    threading.Thread(target=loop.run_forever, name="inbox-sender", daemon=True).start()
                    self._loop, self._pid = loop, os.getpid()
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop())
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


_sender = _SenderLoop()


def send_to_user(user_id: Any, message: dict[str, Any], *, timeout: float = SEND_TIMEOUT) -> int:
    """Push ``message`` to every open inbox of the user, numbered; returns its ``seq``.

    Raises on failure or after ``timeout`` seconds, so the calling task retries. On the inbox's own
    layer the calling thread sends itself, on a blocking Redis client
    (``InboxChannelLayer.group_send_numbered_sync``); any other layer is driven from this process's
    sender loop.
    """
    layer = get_channel_layer()
    if isinstance(layer, InboxChannelLayer):
        group, build = user_group(user_id), _numbered(message)
        try:
            numbered: int = layer.group_send_numbered_sync(
                group, build, sequence_ttl=SEQUENCE_TTL, timeout=timeout
            )
        except RedisConnectionError:  # a pooled connection Redis dropped (a restart): once more
            numbered = layer.group_send_numbered_sync(
                group, build, sequence_ttl=SEQUENCE_TTL, timeout=timeout
            )
        return numbered

    # Looked up on the loop's thread each time: the cached layer is reused, and a replaced
    # configuration (channel_layers.backends cleared) takes effect on the next send.
    async def send() -> int:
        try:
            return await group_send_sequenced(get_channel_layer(), user_group(user_id), message)
        except RedisConnectionError:
            # A pooled connection Redis dropped (a restart) fails once and is discarded; the pool
            # reconnects for the second try. A Redis still down fails again, and the task retries.
            return await group_send_sequenced(get_channel_layer(), user_group(user_id), message)

    return _sender.run(send(), timeout)


def push_now(user_id: Any, message: dict[str, Any]) -> bool:
    """Push from the process that just committed the change; False if that did not work.

    The news of a decision, an expiry or a redemption then costs this process two Redis round
    trips instead of a Celery message and a task in a worker (about a tenth of a flow's CPU under
    ``bench/load.py``). It is exactly as durable: the row is committed before either path runs,
    and a caller that gets False queues the task, which retries until Redis answers. The sequence
    number each push carries keeps the inbox's order whichever process sent it.
    """
    try:
        send_to_user(user_id, message, timeout=DIRECT_SEND_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the task is the fallback, and it logs its own failures
        log.info("direct push to user %s failed (%s); queued for the worker", user_id, type(exc).__name__)
        return False
    return True

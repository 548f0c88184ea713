"""The live inbox websocket (``/ws/approvals/``).

Session-authenticated and Origin-checked (``config.asgi``). On connect it joins the user's own
group first, then sends a snapshot of pending prompts from the database with the user's current
sequence, so nothing sent in between is lost and a reconnect misses nothing.

The stream is ordered (``approvals.delivery``): every upsert and remove carries ``seq``. The page
asks for a fresh snapshot when it sees a gap (``{"type": "resync"}``) and, every few seconds,
sends the last ``seq`` it applied (``{"type": "check", "seq": n}``); the answer is a snapshot if
the user's sequence has moved since, and nothing otherwise.

Client input is bounded (RFC 6455 §7.4.1 close codes): a frame larger than MAX_FRAME bytes closes
the socket with 1009 (message too big; the server itself refuses frames past
``config.serving.WS_MAX_SIZE``), more than RATE_BURST messages at once or RATE_PER_SECOND on average
with 1008 (policy violation), anything but those two objects with 4400. The page reconnects and
starts from a snapshot.

A handshake without a signed-in session is refused before accept, and audited
(``consent.limits.websocket``: one row per source a minute, the rest counted).
"""

import json
import time
from typing import Any, cast

from asgiref.typing import WebSocketSendEvent
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.sessions import InstanceSessionWrapper

from consent.limits import jsonbounds
from consent.limits.websocket import audit_handshake_refusal

from .channel_layer import DIRECT_TYPES
from .delivery import sequence_current, user_group
from .metrics import websocket_connections
from .quorum import inbox_prompts

MAX_FRAME = 128
RATE_BURST = 10
RATE_PER_SECOND = 2.0
CLOSE_TOO_BIG = 1009
CLOSE_TOO_FAST = 1008
CLOSE_BAD_INPUT = 4400
CLOSE_NO_SESSION = 4401
MAX_SEQ = 2**53 - 1  # what the page's numbers hold exactly


def _frame_send(send: Any) -> Any:
    """The server's own ``send`` beneath Channels' session wrappers, for pushed frames.

    ``SessionMiddleware`` wraps ``send`` to save a modified session on ``http.response.start``;
    on every other message it still reads the session's state first (a lazy object's attribute
    lookups): a tenth of the ws process's CPU per pushed frame under ``bench/load.py`` (py-spy).
    A pushed frame is a ``websocket.send``, which the wrapper passes through unchanged.
    """
    while isinstance(owner := getattr(send, "__self__", None), InstanceSessionWrapper):
        send = owner.real_send
    return send


def parse_client_message(text: str | None) -> dict[str, Any] | None:
    """The message if it is one the inbox sends, else None."""
    if text is None or len(text) > MAX_FRAME:
        return None
    try:
        jsonbounds.check(text, max_bytes=MAX_FRAME, depth=2)
        content = json.loads(text)
    except ValueError:
        return None
    if not isinstance(content, dict):
        return None
    if content == {"type": "resync"}:
        return content
    if set(content) == {"type", "seq"} and content["type"] == "check":
        seq = content["seq"]
        if type(seq) is int and 0 <= seq <= MAX_SEQ:
            return content
    return None


class ApprovalsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await database_sync_to_async(audit_handshake_refusal)(self.scope, reason="no_session")
            await self.close(code=CLOSE_NO_SESSION)  # before accept: the handshake is refused
            return
        self.user_id = user.pk
        self.group = user_group(user.pk)
        self.frame_send = _frame_send(self.base_send)  # pushes are attached after the snapshot below
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.joined_at = time.monotonic()
        self.tokens, self.refilled_at = float(RATE_BURST), time.monotonic()
        await self.accept()
        websocket_connections.inc()
        await self.send_snapshot()

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            self._go_buffered()
            websocket_connections.dec()
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        # Decisions are CSRF-protected POSTs; the socket only carries the two requests below.
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > MAX_FRAME:
            await self.close(code=CLOSE_TOO_BIG)
            return
        if not self._take_token():
            await self.close(code=CLOSE_TOO_FAST)
            return
        content = parse_client_message(text_data)
        if content is None:
            await self.close(code=CLOSE_BAD_INPUT)
            return
        if content["type"] == "resync":
            await self.send_snapshot()
            return
        await self._keep_membership()
        if await sequence_current(self.channel_layer, self.group) != content["seq"]:
            await self.send_snapshot()

    async def send_snapshot(self) -> None:
        # Pushes wait in this socket's buffer meanwhile, so none overtakes the snapshot.
        self._go_buffered()
        # The sequence first: everything sent up to it was committed before it was counted.
        seq = await sequence_current(self.channel_layer, self.group)
        prompts = await database_sync_to_async(inbox_prompts)(user_id=self.user_id)
        await self.send_json({"type": "snapshot", "seq": seq, "prompts": prompts})
        self._go_direct()

    # Pushes go straight from the channel layer's reader to the socket while nothing else is
    # being sent here (InboxChannelLayer._route), and through this consumer's buffer otherwise.
    def _go_direct(self) -> None:
        layer: Any = self.channel_layer  # InboxChannelLayer, or another layer without direct pushes
        if hasattr(layer, "attach_direct"):
            buffered = layer.receive_buffer.get(self.channel_name)
            if buffered is None or buffered.empty():
                layer.attach_direct(self.channel_name, self._push_frame)

    def _go_buffered(self) -> None:
        if hasattr(self.channel_layer, "detach_direct"):
            self.channel_layer.detach_direct(self.channel_name)

    async def _push_frame(self, text: str) -> None:
        await self.frame_send(cast(WebSocketSendEvent, {"type": "websocket.send", "text": text}))

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(RATE_BURST), self.tokens + (now - self.refilled_at) * RATE_PER_SECOND)
        self.refilled_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def _keep_membership(self) -> None:
        """Re-join the group well before group_expiry drops a long-open socket from it."""
        # Every layer Channels ships has group_expiry; the stubs' base class does not.
        if time.monotonic() - self.joined_at > self.channel_layer.group_expiry / 4:  # type: ignore[attr-defined]
            await self.channel_layer.group_add(self.group, self.channel_name)
            self.joined_at = time.monotonic()

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections before every handler, through a hop to a
        # worker thread and back. A push touches no database: it goes straight to the socket.
        # The frame arrives encoded once for all of the user's sockets (delivery.client_frame).
        # Everything else (the socket's own events) keeps Channels' dispatch.
        if message["type"] in _PUSHES:
            await self.send(text_data=message["text"])
            self._go_direct()  # the buffer drained: the next push may go straight to the socket
            return
        await super().dispatch(message)


_PUSHES = DIRECT_TYPES

"""The live inbox websocket (``/ws/approvals/``).

Session-authenticated and Origin-checked (``config.asgi``). On connect it joins
the user's own group first, then replays pending prompts from the database, so
nothing sent in between is lost and a reconnect misses nothing (channels_redis
drops messages past a channel's capacity; the database does not).
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from config.metrics import websocket_connections

from .delivery import pending_prompts, user_group


class ApprovalsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)  # before accept: the handshake is refused
            return
        self.group = user_group(user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        websocket_connections.inc()
        prompts = await database_sync_to_async(pending_prompts)(user_id=user.pk)
        await self.send_json({"type": "snapshot", "prompts": prompts})

    async def disconnect(self, code):
        if hasattr(self, "group"):
            websocket_connections.dec()
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        # The inbox only listens; decisions are CSRF-protected POSTs.
        pass

    async def approval_upsert(self, event):
        await self.send_json({"type": "upsert", "prompt": event["prompt"]})

    async def approval_remove(self, event):
        await self.send_json({"type": "remove", "id": event["id"], "status": event["status"],
                              "label": event.get("label", "")})

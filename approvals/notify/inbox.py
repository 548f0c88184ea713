"""The websocket channel's part in the delivery record, and the hook that fans a prompt out.

``approvals.deliver_prompt`` calls ``prompt_sent_to_inbox`` after its websocket push. Whether an
inbox was open to take it is read from the user's channel-layer group (channels_redis keeps its
members in a sorted set scored by when they joined; members older than ``group_expiry`` are
ones a crashed process left behind). A closed laptop has none: the other channels still go.
"""

import time
from typing import Any

from channels.layers import get_channel_layer

from ..channel_layer import InboxChannelLayer
from ..delivery import _sender, user_group
from ..models import ApprovalRequest
from .models import PromptDelivery
from .services import delivery_record
from .tasks import prompt_fan_out

LISTENERS_TIMEOUT = 2.0


def open_inboxes(user_id: Any) -> int | None:
    """How many inbox sockets of the user are subscribed now; None when the layer cannot say.

    On the inbox's own layer the calling thread asks Redis itself (``group_size_sync``); a hop to
    the sender loop's thread and back cost more than the ZCOUNT.
    """
    layer: Any = get_channel_layer()
    if isinstance(layer, InboxChannelLayer):
        try:
            return layer.group_size_sync(user_group(user_id), timeout=LISTENERS_TIMEOUT)
        except Exception:  # noqa: BLE001 - only a record of the channel: never fail the delivery for it
            return None

    async def count() -> int | None:
        layer: Any = get_channel_layer()  # a Redis layer of channels_redis, checked below
        if not all(hasattr(layer, name) for name in ("_group_key", "connection", "consistent_hash")):
            return None
        group = user_group(user_id)
        connection = layer.connection(layer.consistent_hash(group))
        since = time.time() - getattr(layer, "group_expiry", 86400)
        return int(await connection.zcount(layer._group_key(group), since, "+inf"))

    try:
        result: int | None = _sender.run(count(), LISTENERS_TIMEOUT)
    except Exception:  # only a record of the channel: never fail the delivery for it
        return None
    return result


def prompt_sent_to_inbox(*, approval: ApprovalRequest, first: bool) -> None:
    """Record whether an open inbox took the prompt and, on its first delivery, fan it out to the
    user's devices, mailbox and organisation webhooks (``approvals.notify.tasks.prompt_fan_out``,
    in this same task run: one task per prompt, not two)."""
    listeners = open_inboxes(approval.user_id)
    if listeners is not None:
        channel, outcome = PromptDelivery.Channel.WEBSOCKET, PromptDelivery.Outcome
        if listeners > 0:
            delivery_record(approval=approval, channel=channel, outcome=outcome.DELIVERED, audit=False)
        elif first:
            delivery_record(approval=approval, channel=channel, outcome=outcome.FAILED, error="no open inbox")
    if first:
        prompt_fan_out(approval=approval, reached=bool(listeners))

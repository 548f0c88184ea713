"""Pushes go from the channel layer's reader straight to the sockets that attached themselves, in
order, and through the buffer of any socket busy with a snapshot; against the real Redis layer."""

import asyncio
from typing import Any

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import channel_layers

from approvals.channel_layer import RECEIVE_BATCH, InboxChannelLayer
from approvals.delivery import group_send_sequenced, user_group

GROUP = user_group(424242)


def _upsert(n: int) -> dict[str, Any]:
    return {"type": "approval.upsert", "prompt": {"id": f"p{n}"}}


async def _scenario() -> tuple[list[str], list[str], list[dict[str, Any]]]:
    # A layer of its own: the process's shared one may hold locks of another test's event loop.
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    assert isinstance(layer, InboxChannelLayer)
    direct_a, direct_b = await layer.new_channel(), await layer.new_channel()
    busy = await layer.new_channel()
    for channel in (direct_a, direct_b, busy):
        await layer.group_add(GROUP, channel)
    seen_a: list[str] = []
    seen_b: list[str] = []

    async def send_a(text: str) -> None:
        seen_a.append(text)

    async def send_b(text: str) -> None:
        await asyncio.sleep(0)  # a socket that yields on every send keeps its order all the same
        seen_b.append(text)

    layer.attach_direct(direct_a, send_a)
    layer.attach_direct(direct_b, send_b)
    waiting = asyncio.ensure_future(layer.receive(busy))  # starts the process's reader
    for n in range(5):
        await group_send_sequenced(layer, GROUP, _upsert(n))
    buffered = [await waiting]
    for _ in range(4):
        buffered.append(await layer.receive(busy))
    for _ in range(50):  # let the send tasks run
        if len(seen_a) == 5 and len(seen_b) == 5:
            break
        await asyncio.sleep(0.01)

    # A direct socket that detaches (a snapshot being sent) gets the next push through its buffer.
    layer.detach_direct(direct_a)
    await group_send_sequenced(layer, GROUP, _upsert(5))
    buffered_a = await asyncio.wait_for(layer.receive(direct_a), 5)
    assert buffered_a["type"] == "approval.upsert" and '"p5"' in buffered_a["text"]
    assert len(seen_a) == 5
    for channel in (direct_a, direct_b, busy):
        await layer.group_discard(GROUP, channel)
        layer.detach_direct(channel)
    layer._reader.cancel()
    return seen_a, seen_b, buffered


def test_attached_sockets_get_every_frame_in_order_and_a_busy_one_through_its_buffer() -> None:
    seen_a, seen_b, buffered = asyncio.run(_scenario())
    seqs = [[int(t.split('"seq":')[1].split(",")[0]) for t in seen] for seen in (seen_a, seen_b)]
    # In order and consecutive (nothing dropped); the one still attached also got the sixth push.
    assert seqs[0] == [seqs[0][0] + i for i in range(5)] and seqs[1] == [seqs[0][0] + i for i in range(6)]
    assert [m["text"] for m in buffered] == seen_a  # the same frames, whichever way they went


def test_pushes_survive_redis_forgetting_the_scripts() -> None:
    """The send scripts run by SHA1; after Redis lost its script cache (a restart, SCRIPT FLUSH)
    the next push loads them again, from a request thread and from an event loop alike."""

    def numbered(seq: int) -> dict[str, Any]:
        return {"type": "approval.upsert", "seq": seq, "text": f'{{"seq":{seq}}}'}

    async def received_after(from_a_thread: bool) -> dict[str, Any]:
        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)  # one per event loop
        assert isinstance(layer, InboxChannelLayer)
        channel = await layer.new_channel()
        await layer.group_add(GROUP, channel)
        layer._sync_client(layer.consistent_hash(GROUP), 5.0).script_flush()
        if from_a_thread:
            await asyncio.to_thread(
                layer.group_send_numbered_sync, GROUP, numbered, sequence_ttl=60, timeout=5.0
            )
        else:
            await layer.group_send_numbered(GROUP, numbered, sequence_ttl=60)
        try:
            return await asyncio.wait_for(layer.receive(channel), 5)
        finally:
            await layer.group_discard(GROUP, channel)
            layer._reader.cancel()

    first = asyncio.run(received_after(from_a_thread=True))
    second = asyncio.run(received_after(from_a_thread=False))
    assert first["seq"] + 1 == second["seq"] and second["text"] == f'{{"seq":{second["seq"]}}}'


@pytest.mark.parametrize(
    "bzmpop", [True, False], ids=["one BZMPOP per batch", "Redis without BZMPOP: ZPOPMIN, BZPOPMIN"]
)
def test_the_reader_hands_on_a_backlog_whole_and_in_order(bzmpop: bool) -> None:
    """Messages that piled up before the reader ran (more than one batch of them) reach every
    channel of the process, each once and in the order sent."""
    sent = RECEIVE_BATCH * 2 + 5

    async def scenario() -> list[list[int]]:
        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        assert isinstance(layer, InboxChannelLayer)
        layer._bzmpop_missing = not bzmpop
        channels = [await layer.new_channel() for _ in range(3)]
        for channel in channels:
            await layer.group_add(GROUP, channel)
        for n in range(sent):
            await group_send_sequenced(layer, GROUP, _upsert(n))
        seen: list[list[int]] = []
        for channel in channels:
            frames = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(sent)]
            seen.append([int(f["text"].split('"seq":')[1].split(",")[0]) for f in frames])
        for channel in channels:
            await layer.group_discard(GROUP, channel)
        layer._reader.cancel()
        return seen

    for seqs in asyncio.run(scenario()):
        assert seqs == [seqs[0] + i for i in range(sent)]

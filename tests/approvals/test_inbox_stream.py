"""The inbox stream's order and repair, and the bounds on what a client may send, against the real
server (uvicorn + channels_redis) and worker (Celery).

A "dropped" message is made exactly as channels_redis drops one past capacity: the prompt is
committed and the user's sequence counted, but nothing reaches the group.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer
from websockets.exceptions import ConnectionClosed

from approvals import tasks as approval_tasks
from approvals.consumers import MAX_FRAME, RATE_BURST, ApprovalsConsumer, parse_client_message
from approvals.delivery import sequence_current, sequence_next, user_group
from config.celery import app as celery_app
from config.serving import WS_MAX_SIZE
from consent.models import ScopePolicy
from tests.approvals.support import ledger_entry, request_approval, session_grant
from tests.approvals.test_delivery_live import Inbox
from tests.conftest import Scenario
from tests.live import LiveStack

pytestmark = [pytest.mark.django_db(transaction=True)]


class _Held:
    """Stands in for the deliver_prompt task: records the ids instead of queueing a push."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def apply_async(self, args: tuple[Any, ...] = (), **options: Any) -> None:
        self.ids.append(str(args[0]))


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> _Held:
    held = _Held()
    monkeypatch.setitem(celery_app.tasks, approval_tasks.deliver_prompt.name, held)
    return held


def _in_thread(coroutine_function: Callable[[Any, str], Awaitable[int]], user_id: int) -> int:
    # A thread of its own: Playwright's sync API keeps an event loop in the test's thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(
            async_to_sync(coroutine_function), get_channel_layer(), user_group(user_id)
        ).result()


def _drop(user_id: int) -> int:
    """Count a push in the user's stream without sending it: a message lost on the way."""
    return _in_thread(sequence_next, user_id)


def _current(user_id: int) -> int:
    return _in_thread(sequence_current, user_id)


def _closed_with(inbox: Inbox) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            inbox.next(timeout=5)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def test_snapshot_carries_the_sequence_and_every_push_the_next_number(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy
) -> None:
    inbox = Inbox(live, scenario.user)
    try:
        snapshot = inbox.next()
        assert snapshot["type"] == "snapshot" and snapshot["prompts"] == []
        assert snapshot["seq"] == _current(scenario.user.pk)
        grant = session_grant(scenario)
        ids = {str(request_approval(grant, [ledger_entry(str(n))])[0].pk) for n in (1, 2, 3)}
        upserts = [inbox.next_of("upsert") for _ in ids]
        assert {u["prompt"]["id"] for u in upserts} == ids
        assert sorted(u["seq"] for u in upserts) == [snapshot["seq"] + n for n in (1, 2, 3)]
    finally:
        inbox.close()


def test_resync_answers_with_what_the_database_holds(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy, held: _Held
) -> None:
    inbox = Inbox(live, scenario.user)
    try:
        first = inbox.next()
        approval, _ = request_approval(session_grant(scenario))
        seq = _drop(scenario.user.pk)
        assert held.ids == [str(approval.pk)]
        inbox.ws.send(json.dumps({"type": "resync"}))
        snapshot = inbox.next_of("snapshot")
        assert [p["id"] for p in snapshot["prompts"]] == [str(approval.pk)]
        assert snapshot["seq"] == seq and seq > first["seq"]
    finally:
        inbox.close()


def test_check_answers_only_when_the_stream_moved(
    live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy, held: _Held
) -> None:
    inbox = Inbox(live, scenario.user)
    try:
        seq = inbox.next()["seq"]
        inbox.ws.send(json.dumps({"type": "check", "seq": seq}))
        with pytest.raises(TimeoutError):
            inbox.next(timeout=1.5)  # up to date: nothing to say

        approval, _ = request_approval(session_grant(scenario))
        dropped = _drop(scenario.user.pk)  # the newest push is lost: no later one shows a gap
        inbox.ws.send(json.dumps({"type": "check", "seq": seq}))
        snapshot = inbox.next_of("snapshot", timeout=5)
        assert snapshot["seq"] == dropped
        assert [p["id"] for p in snapshot["prompts"]] == [str(approval.pk)]
    finally:
        inbox.close()


@pytest.mark.parametrize(
    "frame",
    [
        json.dumps({"type": "check", "seq": 1, "pad": "x" * 20}),
        "not json",
        json.dumps([{"type": "resync"}]),
        json.dumps({"type": "check", "seq": "7"}),
        json.dumps({"type": "check", "seq": True}),
        json.dumps({"type": "check", "seq": -1}),
        json.dumps({"type": "subscribe", "group": "approvals.user.1"}),
        b"\x00\x01binary",
    ],
)
def test_garbage_closes_the_socket(live: LiveStack, scenario: Scenario, frame: str | bytes) -> None:
    inbox = Inbox(live, scenario.user)
    try:
        inbox.next()
        inbox.ws.send(frame)
        assert _closed_with(inbox) == 4400
    finally:
        inbox.close()


@pytest.mark.parametrize("size", [MAX_FRAME + 1, 4 * WS_MAX_SIZE])
def test_an_oversized_frame_closes_the_socket_with_1009(
    live: LiveStack, scenario: Scenario, size: int
) -> None:
    # Past MAX_FRAME the consumer closes; past --ws-max-size uvicorn does, before the app sees it.
    # (Frames go uncompressed, config.serving: one of megabytes would still be on its way when the
    # server closes, and the reset that follows can overtake the close frame; a few KiB cannot.)
    inbox = Inbox(live, scenario.user)
    try:
        inbox.next()
        try:
            inbox.ws.send("x" * size)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1009
        else:
            assert _closed_with(inbox) == 1009
    finally:
        inbox.close()


def test_a_client_sending_too_fast_is_closed(live: LiveStack, scenario: Scenario) -> None:
    inbox = Inbox(live, scenario.user)
    try:
        seq = inbox.next()["seq"]
        try:
            for _ in range(RATE_BURST * 3):
                inbox.ws.send(json.dumps({"type": "check", "seq": seq}))
        except ConnectionClosed as closed:  # the server may close before the client is done sending
            assert closed.rcvd is not None and closed.rcvd.code == 1008
        else:
            assert _closed_with(inbox) == 1008
    finally:
        inbox.close()


def test_parse_client_message_accepts_only_the_two_requests() -> None:
    assert parse_client_message('{"type":"resync"}') == {"type": "resync"}
    assert parse_client_message('{"type":"check","seq":42}') == {"type": "check", "seq": 42}
    assert parse_client_message('{"type":"check","seq":9007199254740992}') is None  # beyond 2**53 - 1
    assert parse_client_message('{"type":"check","seq":1.5}') is None
    assert parse_client_message('{"type":"resync","seq":1}') is None
    assert parse_client_message("[" * 60 + "]" * 60) is None  # nested arrays: parsed, but not an object
    assert parse_client_message(None) is None


def test_a_long_open_socket_rejoins_its_group_before_group_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    class Layer:
        group_expiry = 3600

        def __init__(self) -> None:
            self.added: list[tuple[str, str]] = []

        async def group_add(self, group: str, channel: str) -> None:
            self.added.append((group, channel))

    consumer = ApprovalsConsumer()
    layer = Layer()  # only what _keep_membership uses
    consumer.channel_layer, consumer.group, consumer.channel_name = (
        cast(BaseChannelLayer, layer),
        "approvals.user.7",
        "specific.x!y",
    )
    clock = [1000.0]
    monkeypatch.setattr("approvals.consumers.time.monotonic", lambda: clock[0])
    consumer.joined_at = clock[0]

    clock[0] += 3600 / 4 - 1
    asyncio.run(consumer._keep_membership())
    assert layer.added == []
    clock[0] += 2
    asyncio.run(consumer._keep_membership())
    assert layer.added == [("approvals.user.7", "specific.x!y")]
    asyncio.run(consumer._keep_membership())
    assert len(layer.added) == 1  # once per quarter of group_expiry, not per check

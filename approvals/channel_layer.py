"""The Redis channel layer behind the live inbox: channels_redis with a pool that waits.

channels_redis gives every event loop one ``redis.asyncio.ConnectionPool``
(``channels_redis.utils.create_pool``: ``ConnectionPool.from_url(address, **host)``). In
redis-py 8 that pool holds at most 100 connections by default and, when all of them are busy,
``get_available_connection`` raises ``MaxConnectionsError("Too many connections")`` instead of
waiting. A web process runs every websocket consumer on one loop, so when hundreds of sockets
close at once (a load balancer drains, a node's clients reconnect elsewhere, a browser quits),
hundreds of ``disconnect`` handlers each call ``group_discard`` at the same moment: each ZREM
checks a connection out of the pool, the 101st finds none and raises. Connects in a burst fail
the same way in ``group_add``.

A bigger ``max_connections`` only moves the cliff (and opens as many sockets to Redis as there
are simultaneous callers). A ``BlockingConnectionPool`` keeps the pool bounded and makes the
extra callers queue for a free connection: a ZREM takes well under a millisecond, so a
queue of hundreds drains in a fraction of a second, and ``pool_timeout`` only fires if Redis
itself stops answering.

One connection per loop stays checked out by the reader's blocking pop (BZMPOP, up to
``brpop_timeout``, 5 s): the pool must hold more than one.

``group_send_numbered`` is the inbox's send (``approvals.delivery``): a numbered message to a
group in two round trips to Redis instead of five. channels_redis' ``group_send`` makes four (drop
aged-out members, read the members, drop expired messages of each channel key, the capacity-checked
ZADD script), and numbering the message was one more. Under load a worker's delivery task spent
most of its wall time waiting on those round trips, and deliveries queued behind it. Here one
script numbers the message and reads the group's current members, and one script per shard drops
each key's expired messages and adds the new one within capacity. The keys, the serialized
messages and the capacity rule are channels_redis' own (``_group_key``,
``_map_channel_keys_to_connection``), so its receive side reads them unchanged.
"""

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from channels_redis.core import RedisChannelLayer
from redis import asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

log = logging.getLogger(__name__)
# The most messages the process's reader takes off Redis in one round trip (BZMPOP ... COUNT).
RECEIVE_BATCH = 64
# Messages that carry the frame every socket of the user gets (approvals.delivery.client_frame).
DIRECT_TYPES = frozenset({"approval.upsert", "approval.remove", "grant.changed"})

# KEYS: the sequence, the group. ARGV: the sequence's TTL, the score below which members aged out.
_NUMBER_AND_READ = """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, ARGV[2])
return {seq, redis.call('ZRANGE', KEYS[2], 0, -1)}
"""

# channels_redis' group-send script, each key's expired messages dropped first (its separate pipeline).
# KEYS: channel keys. ARGV: a message per key, a capacity per key, now, expiry, the expired-before score.
_SEND = """
local over_capacity = 0
local current_time = ARGV[#ARGV - 2]
local expiry = ARGV[#ARGV - 1]
local expired = ARGV[#ARGV]
for i=1,#KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, expired)
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
        redis.call('ZADD', KEYS[i], current_time, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""


# Both scripts run by their SHA1 (EVALSHA): the text goes over the wire, and Redis hashes it, only
# when its script cache does not hold it yet (after a restart, a SCRIPT FLUSH), through EVAL.
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_NUMBER_AND_READ, _SEND)}


def _run(client: redis.Redis, script: str, *keys_and_args: Any) -> Any:
    try:
        return client.evalsha(_SHA[script], *keys_and_args)
    except NoScriptError:
        return client.eval(script, *keys_and_args)  # and Redis keeps it for the next EVALSHA


async def _run_async(client: aioredis.Redis, script: str, *keys_and_args: Any) -> Any:
    try:
        return await client.evalsha(_SHA[script], *keys_and_args)
    except NoScriptError:
        return await client.eval(script, *keys_and_args)


class InboxChannelLayer(RedisChannelLayer):  # type: ignore[misc]  # channels_redis ships no types
    def __init__(self, *args: Any, pool_size: int = 50, pool_timeout: float = 10.0, **kwargs: Any):
        if pool_size < 2:
            raise ValueError("pool_size must leave a connection free beside the receive loop's BZPOPMIN")
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self._direct: dict[str, Callable[[str], Awaitable[None]]] = {}
        self._sync_clients: dict[tuple[int, int, float], redis.Redis] = {}
        self._sync_lock = threading.Lock()
        self._bzmpop_missing = False
        super().__init__(*args, **kwargs)

    def _host(self, index: int) -> tuple[str, dict[str, Any]]:
        """Shard ``index``'s address and its other connection options."""
        host = dict(self.hosts[index])
        if "address" not in host:
            raise ValueError("InboxChannelLayer hosts are given as {'address': 'redis://...', ...}")
        return host.pop("address"), host

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        address, host = self._host(index)
        return aioredis.BlockingConnectionPool.from_url(
            address, max_connections=self.pool_size, timeout=self.pool_timeout, **host
        )

    def sequence_key(self, group: str) -> str:
        """The per-user counter beside the group (same shard): see approvals.delivery."""
        return f"{self.prefix}:seq:{group}"

    async def group_send_numbered(
        self, group: str, build: Callable[[int], dict[str, Any]], *, sequence_ttl: int
    ) -> int:
        """Number the next message of ``group`` and send ``build(seq)`` to its members; returns ``seq``."""
        assert self.require_valid_group_name(group), "Group name not valid"
        index, numbering = self._numbering(group, sequence_ttl)
        seq, members = await _run_async(self.connection(index), *numbering)
        seq = int(seq)
        for index, sending in self._sendings(group, members, build(seq)):
            self._over_capacity(await _run_async(self.connection(index), *sending), group, members)
        return seq

    def group_send_numbered_sync(
        self, group: str, build: Callable[[int], dict[str, Any]], *, sequence_ttl: int, timeout: float
    ) -> int:
        """``group_send_numbered`` from a thread that runs no event loop, on a blocking Redis client.

        The same two scripts on the same keys; a web request or a task thread sends without handing
        the send to an event loop in another thread and waiting for it there (in a py-spy profile of
        a web process serving a redemption race, that hop and redis-py's asyncio client were a fifth
        of the samples). ``timeout`` bounds each round trip (a pool per timeout and process).
        """
        assert self.require_valid_group_name(group), "Group name not valid"
        index, numbering = self._numbering(group, sequence_ttl)
        seq, members = _run(self._sync_client(index, timeout), *numbering)
        seq = int(seq)
        for index, sending in self._sendings(group, members, build(seq)):
            self._over_capacity(_run(self._sync_client(index, timeout), *sending), group, members)
        return seq

    def group_size_sync(self, group: str, *, timeout: float) -> int:
        """How many channels are in ``group`` now (members that joined within ``group_expiry``),
        from a thread that runs no event loop (the blocking client ``group_send_numbered_sync`` uses)."""
        since = time.time() - self.group_expiry
        client = self._sync_client(self.consistent_hash(group), timeout)
        return int(client.zcount(self._group_key(group), since, "+inf"))

    def _numbering(self, group: str, sequence_ttl: int) -> tuple[int, tuple[Any, ...]]:
        """(shard, the script and its keys and arguments) that numbers the message and reads the group."""
        return self.consistent_hash(group), (
            _NUMBER_AND_READ,
            2,
            self.sequence_key(group),
            self._group_key(group),
            sequence_ttl,
            int(time.time()) - self.group_expiry,
        )

    def _sendings(
        self, group: str, members: list[bytes], message: dict[str, Any]
    ) -> list[tuple[int, tuple[Any, ...]]]:
        """(shard, the send script with its keys and arguments) for each shard holding a member."""
        channel_names = [m.decode("utf8") for m in members]
        if not channel_names:
            return []
        by_connection, messages, capacities = self._map_channel_keys_to_connection(channel_names, message)
        now = time.time()
        return [
            (
                index,
                (
                    _SEND,
                    len(keys),
                    *keys,
                    *(messages[k] for k in keys),
                    *(capacities[k] for k in keys),
                    now,
                    self.expiry,
                    int(now) - int(self.expiry),
                ),
            )
            for index, keys in by_connection.items()
        ]

    @staticmethod
    def _over_capacity(over: Any, group: str, members: list[bytes]) -> None:
        if over:
            log.info("%s of %s channels over capacity in group %s", over, len(members), group)

    def _sync_client(self, index: int, timeout: float) -> redis.Redis:
        key = (os.getpid(), index, timeout)  # a forked child opens its own connections
        client = self._sync_clients.get(key)
        if client is None:
            with self._sync_lock:
                client = self._sync_clients.get(key)
                if client is None:
                    address, host = self._host(index)
                    host.update(socket_timeout=timeout, socket_connect_timeout=timeout)
                    client = self._sync_clients[key] = redis.Redis(
                        connection_pool=redis.BlockingConnectionPool.from_url(
                            address, max_connections=self.pool_size, timeout=self.pool_timeout, **host
                        )
                    )
        return client

    # --- receiving: one reader per process and loop, not a contest between every socket ---------

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message for ``channel``.

        channels_redis makes every waiting consumer of a process contend for one receive lock:
        each wait creates two tasks (the lock and the channel's buffer), and each message that
        reaches a socket's buffer cancels them and starts the contest again. With a user's many
        open tabs that was a quarter of the ws process's CPU per push (py-spy, bench/load.py).
        Here one reader task per loop pulls the process's messages off Redis (``_receive_batch``)
        into the per-channel buffers, and each consumer only waits on its own buffer. If the reader
        fails (Redis went away), every waiting consumer gets the error, as before, and the next
        receive starts a new reader.
        """
        if "!" not in channel:
            received: dict[str, Any] = await super().receive(channel)
            return received
        assert self.require_valid_channel_name(channel)
        real_channel = self.non_local_name(channel)
        assert real_channel.endswith(self.client_prefix + "!"), "Wrong client prefix"
        self._start_reader(real_channel)
        buffer: asyncio.Queue[dict[str, Any] | _ReaderFailed] = self.receive_buffer[channel]
        try:
            message = await buffer.get()
        except asyncio.CancelledError:
            self.receive_buffer.pop(channel, None)  # the consumer is gone
            raise
        if buffer.empty() and self.receive_buffer.get(channel) is buffer:
            del self.receive_buffer[channel]
        if isinstance(message, _ReaderFailed):
            raise message.error
        return message

    async def _receive_batch(self, real_channel: str) -> list[tuple[Any, dict[str, Any]]]:
        """The messages waiting for this process, oldest first, up to ``RECEIVE_BATCH``, in one round
        trip; if none is waiting, the next one as soon as it comes (or none within ``brpop_timeout``).

        channels_redis' ``receive_single`` takes four round trips per message: a script that puts
        back what a cancelled receive left in the backup queue, BZPOPMIN, a ZADD into that backup
        queue, and a cleaner that empties it again. The backup queue is there for receives that a
        consumer cancels; this reader is one long-lived task per process, and a message it has
        taken goes only to sockets of this process, which close with it. The inbox does not rely
        on the stream either (``approvals.delivery``: numbered messages, and a snapshot on a gap or
        on reconnect). So one BZMPOP (Redis 7) takes what is waiting, in the order
        ``receive_single`` would have. A Redis without BZMPOP gets a ZPOPMIN of what is waiting
        and, when nothing is, a BZPOPMIN.
        """
        connection = self.connection(self.consistent_hash(real_channel))
        key = self.prefix + real_channel
        popped: list[Any] | None = None
        if not self._bzmpop_missing:
            try:
                got = await connection.bzmpop(self.brpop_timeout, 1, [key], min=True, count=RECEIVE_BATCH)
                popped = [] if got is None else got[1]
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                log.warning("Redis has no BZMPOP (before 7.0): the inbox reader pops with ZPOPMIN/BZPOPMIN")
                self._bzmpop_missing = True
        if popped is None:
            popped = await connection.zpopmin(key, RECEIVE_BATCH)
            if not popped:
                one = await connection.bzpopmin(key, timeout=self.brpop_timeout)
                popped = [] if one is None else [(one[1], one[2])]
        received = []
        for member, _score in popped:
            message = self.deserialize(member)
            received.append((message.pop("__asgi_channel__", real_channel), message))
        return received

    def _start_reader(self, real_channel: str) -> None:
        loop = asyncio.get_running_loop()
        reader = getattr(self, "_reader", None)
        if reader is not None and not reader.done() and reader.get_loop() is loop:
            return
        self._reader = loop.create_task(self._read(real_channel), name="inbox-channel-reader")

    # --- pushes straight to the socket ------------------------------------------------------------

    def attach_direct(self, channel: str, send: Callable[[str], Awaitable[None]]) -> None:
        """Hand the frames of pushes for ``channel`` straight to ``send`` from now on (see ``_read``)."""
        self._direct[channel] = send

    def detach_direct(self, channel: str) -> None:
        """Pushes for ``channel`` go through its buffer again (the consumer is busy, or gone)."""
        self._direct.pop(channel, None)

    def _route(
        self, chan: str, message: dict[str, Any], text: str | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Deliver one message to one local channel: straight to its socket when it can be, else buffered.

        A push (a message carrying its encoded frame, ``delivery.client_frame``) to a consumer that
        attached itself (``ApprovalsConsumer``: accepted, its snapshot sent) and has nothing
        buffered becomes one send on the socket, in a task of its own: no wake-up of the
        consumer's receive loop, no Channels dispatch, which was most of the ws process's CPU per
        push to a user with many open tabs. Order per socket holds: the tasks start in the order
        the messages arrive, each send waits its turn on the socket's flow control, and while
        anything is buffered for a channel (the consumer detached itself to send a snapshot, or
        had not finished the last buffered push) new messages join that buffer behind it.
        """
        if text is not None:
            send = self._direct.get(chan)
            buffered = self.receive_buffer.get(chan)
            if send is not None and (buffered is None or buffered.empty()):
                loop.create_task(_send_quietly(send, text))
                return
        self.receive_buffer[chan].put_nowait(message)

    async def _read(self, real_channel: str) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        try:
            while True:
                batch = await self._receive_batch(real_channel)
                # redis-py can answer a blocking pop cancelled mid-read with its "nothing came" None:
                # a cancelled reader (its loop is closing) stops here instead of blocking again, and
                # holding up the loop's close (tests/approvals/test_removal_push.py hung on that).
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                for target, message in batch:
                    text = message.get("text") if message.get("type") in DIRECT_TYPES else None
                    for chan in target if isinstance(target, list) else [target]:
                        self._route(chan, message, text, loop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiting consumer
            failed = _ReaderFailed(exc)
            for buffer in list(self.receive_buffer.values()):
                buffer.put_nowait(failed)


async def _send_quietly(send: Callable[[str], Awaitable[None]], text: str) -> None:
    try:
        await send(text)
    except Exception:  # noqa: BLE001 - a socket that closed meanwhile: its consumer is leaving anyway
        log.debug("push to a closing socket dropped", exc_info=True)


class _ReaderFailed:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error

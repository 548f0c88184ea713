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

One connection per loop stays checked out by the receive loop's blocking BZPOPMIN (up to
``brpop_timeout``, 5 s): the pool must hold more than one.
"""

from typing import Any

from channels_redis.core import RedisChannelLayer
from redis import asyncio as aioredis


class InboxChannelLayer(RedisChannelLayer):
    def __init__(self, *args: Any, pool_size: int = 50, pool_timeout: float = 10.0, **kwargs: Any):
        if pool_size < 2:
            raise ValueError("pool_size must leave a connection free beside the receive loop's BZPOPMIN")
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        super().__init__(*args, **kwargs)

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host = dict(self.hosts[index])
        if "address" not in host:
            raise ValueError("InboxChannelLayer hosts are given as {'address': 'redis://...', ...}")
        address = host.pop("address")
        return aioredis.BlockingConnectionPool.from_url(
            address, max_connections=self.pool_size, timeout=self.pool_timeout, **host)

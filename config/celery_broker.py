"""Celery's Redis transport with one publishing client per channel.

kombu's Redis channel builds a new ``redis.Redis`` client object for every message it
publishes (``Channel.conn_or_acquire`` -> ``_create_client``), and redis-py's client
constructor copies its table of ~170 response callbacks each time: measured here,
that was half of the ~1 ms of CPU an ``apply_async`` cost, paid by every request that
queues news of an approval. A redis-py client is safe to share (each command takes a
connection from the channel's pool), so each channel keeps one for publishing. The
pool, reconnection and close paths are kombu's, unchanged: a new channel after a lost
connection gets a new client.

``config/celery.py`` makes it the transport of ``redis://`` broker URLs.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

from kombu.transport import redis
from redis import Redis


class Channel(redis.Channel):
    @cached_property
    def _publishing_client(self) -> Redis:
        return self._create_client()  # type: ignore[attr-defined, no-any-return]  # kombu's own, absent from its stubs

    @contextmanager
    def conn_or_acquire(self, client: Redis | None = None) -> Iterator[Redis]:
        yield client or self._publishing_client


class Transport(redis.Transport):
    Channel = Channel

"""Sessions read from Redis and kept in the database: Django's ``cached_db`` store, cache copies short-lived.

Every page request of a signed-in person, and every inbox websocket that connects, loads the
session. With the database store that is one SELECT each time; in a py-spy profile of the web
process under ``bench/approval_roundtrip.py`` reading the session was over half of what the
officer's approve POST spent before its view ran. ``cached_db`` reads the cache first and the
database only on a miss (then fills the cache), and writes the database first, then the cache.

The database stays the truth, and the cache copy is kept at most ``CACHE_SECONDS``: a session
deleted while Redis cannot be reached (a sign-out during a Redis outage) leaves a copy Redis
may still hold, and that copy is believed for at most that long. While Redis is down, reads fail
open to the database (``consent.limits.cache.FailOpenRedisCache``): people stay signed in.
"""

import threading
from typing import Any

from django.conf import settings
from django.contrib.sessions.backends.cached_db import SessionStore as CachedDBStore
from django.core.cache import caches
from django.core.cache.backends.base import BaseCache

# The longest a cache copy of a session lives, whatever the session's own expiry (seconds).
CACHE_SECONDS = 60


class ShortLivedCache:
    """The session cache, with every entry's timeout capped at ``seconds``."""

    def __init__(self, cache: BaseCache, seconds: int) -> None:
        self.cache, self.seconds = cache, seconds

    def _timeout(self, timeout: float | None) -> float:
        return self.seconds if timeout is None else min(timeout, self.seconds)

    def get(self, key: str, default: Any = None) -> Any:
        return self.cache.get(key, default)

    def set(self, key: str, value: Any, timeout: float | None = None) -> None:
        self.cache.set(key, value, self._timeout(timeout))

    def delete(self, key: str) -> bool:
        return self.cache.delete(key)

    def __contains__(self, key: str) -> bool:
        return key in self.cache

    async def aget(self, key: str, default: Any = None) -> Any:
        return await self.cache.aget(key, default)

    async def aset(self, key: str, value: Any, timeout: float | None = None) -> None:
        await self.cache.aset(key, value, self._timeout(timeout))

    async def adelete(self, key: str) -> bool:
        return await self.cache.adelete(key)


_shared: ShortLivedCache | None = None
_shared_lock = threading.Lock()


def session_cache() -> ShortLivedCache:
    """The process's one client of the session cache, for every thread and every websocket.

    ``caches[alias]`` (what Django's ``cached_db`` takes) gives each thread and each async
    context a client of its own, with its own connection pool: under Channels every websocket
    that connected held a Redis connection of its own for as long as it stayed open (1,064
    clients for 1,000 idle sockets, and the socket's memory doubled). A Redis client and its
    pool are safe to share between threads.
    """
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = ShortLivedCache(
                    caches.create_connection(settings.SESSION_CACHE_ALIAS), CACHE_SECONDS
                )
    return _shared


class SessionStore(CachedDBStore):
    _cache: Any  # cached_db's cache (the stubs do not declare it); here, shared and capped

    def __init__(self, session_key: str | None = None) -> None:
        # The database store's own set-up, not cached_db's (that looks up ``caches[alias]``).
        super(CachedDBStore, self).__init__(session_key)
        self._cache = session_cache()

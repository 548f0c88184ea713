"""The Redis cache django-axes keeps sign-in failures in, failing open.

Redis unreachable: reads find nothing and writes are dropped (logged), so signing in keeps
working through a Redis outage, without the attempt limit, rather than answering 500.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from django.core.cache.backends.redis import RedisCache

log = logging.getLogger(__name__)


F = TypeVar("F", bound=Callable[..., Any])


def _fail_open(default: object) -> Callable[[F], F]:
    def wrap(method: F) -> F:
        @functools.wraps(method)
        def inner(self: RedisCache, key: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, key, *args, **kwargs)
            except redis.RedisError as exc:
                log.error("limits: sign-in attempt counts unavailable (%s)", type(exc).__name__)
                if callable(default):
                    return default(key, *args, **kwargs)
                return default

        return cast(F, inner)

    return wrap


class FailOpenRedisCache(RedisCache):
    get = _fail_open(lambda key, default=None, version=None: default)(RedisCache.get)
    add = _fail_open(True)(RedisCache.add)
    set = _fail_open(None)(RedisCache.set)
    touch = _fail_open(False)(RedisCache.touch)
    delete = _fail_open(False)(RedisCache.delete)
    incr = _fail_open(lambda key, delta=1, version=None: delta)(RedisCache.incr)
    get_many = _fail_open(lambda keys, version=None: {})(RedisCache.get_many)
    delete_many = _fail_open(None)(RedisCache.delete_many)

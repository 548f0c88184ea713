"""Per-send cost of a worker's push to a user's inbox group: ``async_to_sync(group_send)`` per call
(a new event loop and Redis connection each time) against ``approvals.delivery.send_to_user``
(one loop and pool for the process, plus the sequence INCR).

    REDIS_URL=redis://127.0.0.1:6379/13 .venv/bin/python bench/inbox_send.py [--sends 500] [--rounds 3]

The group holds one member channel, as an open inbox tab would, so every send writes a message.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

import redis  # noqa: E402
from asgiref.sync import async_to_sync  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from django.conf import settings  # noqa: E402

from approvals.channel_layer import InboxChannelLayer  # noqa: E402
from approvals.delivery import send_to_user, user_group  # noqa: E402

USER_ID = 987654321
MESSAGE = {"type": "approval.remove", "id": "bench", "status": "cancelled", "label": "Cancelled"}


def per_call(send: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        send()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sends", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layer = get_channel_layer()
    assert isinstance(layer, InboxChannelLayer)
    group = user_group(USER_ID)
    channel = f"bench.inbox-{os.getpid()}"
    async_to_sync(layer.group_add)(group, channel)
    plain = redis.Redis.from_url(settings.REDIS_URL)
    # The keys this script writes (the channel's queue, the group, the sequence); layer.flush() would
    # also close the pool of the sender's loop from this thread.
    keys = [layer.prefix + channel, layer._group_key(group), f"{layer.prefix}:seq:{group}"]

    def old() -> None:
        current = get_channel_layer()
        assert current is not None
        async_to_sync(current.group_send)(group, MESSAGE)

    def new() -> None:
        send_to_user(USER_ID, MESSAGE)

    results: dict[str, list[float]] = {"async_to_sync(group_send)": [], "send_to_user (one loop)": []}
    try:
        new()  # the first send starts the loop and opens the pool
        for _ in range(args.rounds):  # interleaved, so both see the same machine load
            results["async_to_sync(group_send)"].append(per_call(old, args.sends))
            plain.delete(keys[0])  # nobody reads the channel: keep it below capacity
            results["send_to_user (one loop)"].append(per_call(new, args.sends))
            plain.delete(keys[0])
    finally:
        plain.delete(*keys)
    for name, values in results.items():
        print(
            f"{name:28s} median {statistics.median(values):6.3f} ms/send  "
            f"(rounds: {', '.join(f'{v:.3f}' for v in values)}; {args.sends} sends each)"
        )


if __name__ == "__main__":
    main()

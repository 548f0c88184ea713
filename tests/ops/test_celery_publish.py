"""What a queued task puts on the broker (config/celery.py ``Task``): the message a worker reads."""

import base64
import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from config.celery import ARGS_SHOWN, _redis_broker, app


@pytest.fixture
def queue() -> Iterator[tuple[str, redis.Redis]]:
    name = f"cs-test-publish-{secrets.token_hex(4)}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield name, client
    client.delete(name)


def _messages(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(name, 0, -1)]


def test_a_queued_task_lands_on_its_queue_with_its_arguments_shown(queue: tuple[str, redis.Redis]) -> None:
    name, client = queue
    approval_id = str(uuid.uuid4())

    app.tasks["approvals.deliver_prompt"].apply_async(
        (approval_id,), kwargs={"pushed": True, "pushed_at": 1.5}, queue=name
    )

    (message,) = _messages(client, name)  # on the queue's list though nothing declared it
    headers = message["headers"]
    assert headers["task"] == "approvals.deliver_prompt"
    assert headers["argsrepr"] == repr((approval_id,))
    assert headers["kwargsrepr"] == repr({"pushed": True, "pushed_at": 1.5})
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [approval_id] and kwargs == {"pushed": True, "pushed_at": 1.5}


def test_long_arguments_are_shown_cut_at_celerys_limit(queue: tuple[str, redis.Redis]) -> None:
    name, client = queue

    app.tasks["approvals.deliver_prompt"].apply_async(("x" * 5000,), queue=name)

    (message,) = _messages(client, name)
    assert len(message["headers"]["argsrepr"]) == ARGS_SHOWN
    assert json.loads(base64.b64decode(message["body"]))[0] == ["x" * 5000]  # the task gets them whole


@pytest.mark.parametrize(
    ("url", "redis_transport"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("rediss://cache.internal:6380/0", True),
        ("amqp://guest:guest@127.0.0.1:5672//", False),
        (None, False),
    ],
)
def test_only_a_redis_broker_skips_declaring_queues(url: str | None, redis_transport: bool) -> None:
    assert _redis_broker(url) is redis_transport

"""The Celery app (``config.celery:app``). Tasks take ids and re-read the database."""

import os
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery import Task as CeleryTask
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# redis:// broker URLs use kombu's Redis transport with one publishing client per channel
# (config/celery_broker.py); URLs, logs and every other behaviour stay the stock transport's.
TRANSPORT_ALIASES["redis"] = "config.celery_broker:Transport"

# Django's fix-up, but each worker process keeps its database pool between tasks (config/celery_fixup.py).
# The arguments as monitoring shows them (the message's argsrepr/kwargsrepr), at most Celery's own size.
ARGS_SHOWN = 1024


if TYPE_CHECKING:
    _Base = CeleryTask[Any, Any]
else:
    _Base = CeleryTask


class Task(_Base):
    """Every task's base: publishing without two costs Celery adds to each message for nothing here.

    Measured by callgrind, one ``apply_async`` was 1.58 M instructions, about a whole token
    request's worth, paid by every backchannel request; leaving out these two took it to 1.24 M:

    - ``argsrepr``/``kwargsrepr``: Celery builds them with ``saferepr``, a recursive pretty-printer;
      our tasks take ids and flags, whose ``repr`` is the same text (cut at Celery's limit).
    - ``declare``: to see that the queue was declared, kombu binds a copy of it to the channel on
      every publish. On Redis the default queue's messages are an LPUSH onto its list, declared or
      not (the direct exchange is the "anonymous" one), and workers declare their queues when they
      start consuming, so nothing is declared per message. On another broker (AMQP, where a message
      to an undeclared queue is dropped) Celery declares as usual.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:  # type: ignore[override]
        options.setdefault("argsrepr", repr(tuple(args or ()))[:ARGS_SHOWN])
        options.setdefault("kwargsrepr", repr(kwargs or {})[:ARGS_SHOWN])
        if _redis_broker(self.app.conf.broker_url):
            options.setdefault("declare", [])
        return super().apply_async(args, kwargs, **options)


def _redis_broker(url: Any) -> bool:
    return isinstance(url, str) and url.startswith(("redis://", "rediss://", "redis+socket://"))


app = Celery("countersign", fixups=["config.celery_fixup:fixup"], task_cls="config.celery:Task")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
def _fresh_log_context(task_id: str | None = None, task: object = None, **kwargs: Any) -> None:
    """Each task's log lines carry its own ids, never those of the task before it."""
    from config.logging import log_context

    log_context.set({"request_id": f"task:{task_id}"})

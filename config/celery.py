"""The Celery app (``config.celery:app``). Tasks take ids and re-read the database."""

import os
from typing import Any

from celery import Celery, signals
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# redis:// broker URLs use kombu's Redis transport with one publishing client per channel
# (config/celery_broker.py); URLs, logs and every other behaviour stay the stock transport's.
TRANSPORT_ALIASES["redis"] = "config.celery_broker:Transport"

# Django's fix-up, but each worker process keeps its database pool between tasks (config/celery_fixup.py).
app = Celery("countersign", fixups=["config.celery_fixup:fixup"])
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
def _fresh_log_context(task_id: str | None = None, task: object = None, **kwargs: Any) -> None:
    """Each task's log lines carry its own ids, never those of the task before it."""
    from config.logging import log_context

    log_context.set({"request_id": f"task:{task_id}"})

"""The Celery app (``config.celery:app``). Tasks take ids and re-read the database."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("countersign")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
def _fresh_log_context(task_id=None, task=None, **kwargs):
    """Each task's log lines carry its own ids, never those of the task before it."""
    from config.logging import log_context

    log_context.set({"request_id": f"task:{task_id}"})

"""Celery's Django fix-up, except that a worker process keeps its database pool between tasks.

Celery 5.6's fix-up (``celery.fixups.django.DjangoWorkerFixup._close_database``) closes the
task's connection *and the process's whole psycopg pool* before and after every task in a
prefork worker (celery#10554). Each task then built a new pool: three pool threads started
and joined, and a new PostgreSQL connection (a backend started, authenticated, its settings
read) for one or two statements. py-spy on a worker under ``bench/load.py``: connecting and
the pool's set-up and tear-down were most of the worker's CPU per delivery, and PostgreSQL
paid for a new backend per task on top.

Closing the pool is needed once per child: a forked child must not use the sockets of a pool
it inherited. Celery's own ``on_worker_process_init`` (unchanged here) does that. Between
tasks the connection only goes back to the pool (``conn.close()`` with a pool returns it), as a
web request's does, so a task never holds a connection while it waits for its next message.

``config/celery.py`` installs this in place of the built-in Django fix-up.
"""

import os
from typing import Any

# celery-types describes DjangoFixup only, without the worker half or the version check.
from celery.fixups.django import DjangoFixup, DjangoWorkerFixup, _verify_django_version  # type: ignore[attr-defined]


class WorkerFixup(DjangoWorkerFixup):  # type: ignore[misc]  # untyped, as above
    def _release_connections(self) -> None:
        for conn in self._db.connections.all(initialized_only=True):
            try:
                conn.close()
            except self.interface_errors:
                pass
            except self.DatabaseError as exc:
                if "closed" not in str(exc) and "not connected" not in str(exc):
                    raise

    def on_task_prerun(self, sender: Any, **kwargs: Any) -> None:
        if not getattr(sender.request, "is_eager", False):
            self._release_connections()

    def on_task_postrun(self, sender: Any, **kwargs: Any) -> None:
        if not getattr(sender.request, "is_eager", False):
            self._release_connections()
            self.close_cache()


class Fixup(DjangoFixup):
    @property
    def worker_fixup(self) -> DjangoWorkerFixup:
        if self._worker_fixup is None:  # type: ignore[has-type]  # set by DjangoFixup.__init__, untyped
            self._worker_fixup = WorkerFixup(self.app)
        return self._worker_fixup

    @worker_fixup.setter
    def worker_fixup(self, value: DjangoWorkerFixup) -> None:
        self._worker_fixup = value


def fixup(app: Any, env: str = "DJANGO_SETTINGS_MODULE") -> DjangoFixup | None:
    """Celery's ``celery.fixups.django.fixup`` with our worker half: installed on the same condition."""
    if os.environ.get(env) and "django" not in app.loader_cls.lower():
        import django

        _verify_django_version(django)
        # install() returns the fix-up itself; celery-types says None.
        return Fixup(app).install()  # type: ignore[func-returns-value]
    return None

"""The worker keeps its database pool between tasks (config/celery_fixup.py, celery#10554)."""

from types import SimpleNamespace

import pytest

from config.celery import app
from config.celery_fixup import Fixup, WorkerFixup


class _Connection:
    alias = "default"
    connection = None  # nothing inherited to detach

    def __init__(self) -> None:
        self.closed = self.pool_closed = 0

    def close(self) -> None:
        self.closed += 1

    def close_pool(self) -> None:
        self.pool_closed += 1


def _fixup_with(conn: _Connection, monkeypatch: pytest.MonkeyPatch) -> WorkerFixup:
    fixup = WorkerFixup(app)
    fixup.worker = SimpleNamespace(pool_cls="celery.concurrency.prefork:TaskPool")
    monkeypatch.setattr(
        fixup, "_db", SimpleNamespace(connections=SimpleNamespace(all=lambda initialized_only=False: [conn]))
    )
    fixup._settings = SimpleNamespace(DATABASES={"default": {"OPTIONS": {"pool": {"min_size": 1}}}})
    return fixup


def test_the_app_uses_our_fixup() -> None:
    fixups = app._fixups  # type: ignore[attr-defined]  # private, left out by celery-types
    assert any(isinstance(f, Fixup) for f in fixups)
    assert isinstance(next(f for f in fixups if isinstance(f, Fixup)).worker_fixup, WorkerFixup)


def test_a_task_hands_its_connection_back_and_leaves_the_pool_open(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = _Connection()
    fixup = _fixup_with(conn, monkeypatch)
    task = SimpleNamespace(request=SimpleNamespace(is_eager=False))
    fixup.on_task_prerun(task)
    fixup.on_task_postrun(task)
    assert conn.closed == 2 and conn.pool_closed == 0


def test_a_forked_child_still_closes_the_pool_it_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = _Connection()
    fixup = _fixup_with(conn, monkeypatch)
    fixup.on_worker_process_init()
    assert conn.pool_closed == 1

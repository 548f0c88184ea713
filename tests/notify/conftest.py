from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pytest_django import Settings

from approvals.models import ApprovalRequest
from config.celery import app as celery_app
from consent.models import ScopePolicy
from tests.approvals.support import request_approval, session_grant
from tests.conftest import Scenario

NOTIFY_TASKS = (
    "approvals.notify_prompt",
    "approvals.push_prompt",
    "approvals.email_prompt",
    "approvals.webhook_prompt",
)


@dataclass
class Queue:
    """Tasks of the delivery channels queued on commit: (name, args, options)."""

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    record: Callable[[str], None] = lambda name: None
    real: dict[str, Any] = field(default_factory=dict)  # the tasks themselves, to run one by hand

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args, _ in self.calls if n == name]


class _Recorder:
    def __init__(self, name: str, queue: Queue) -> None:
        self.name, self.queue = name, queue

    def apply_async(self, args: tuple[Any, ...] = (), **options: Any) -> None:
        self.queue.calls.append((self.name, tuple(args), options))


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> Queue:
    queue = Queue()
    queue.record = lambda name: monkeypatch.setitem(celery_app.tasks, name, _Recorder(name, queue))
    for name in NOTIFY_TASKS:
        queue.real[name] = celery_app.tasks[name]
        queue.record(name)
    return queue


@pytest.fixture
def loopback_push(settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "PUSH_ALLOW_LOOPBACK": True}


@pytest.fixture
def approval(scenario: Scenario, ledger_policy: ScopePolicy) -> ApprovalRequest:
    grant = session_grant(scenario)
    return request_approval(grant)[0]

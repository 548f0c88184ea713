"""A new prompt is pushed to the user's open inboxes by the process that committed the request,
through the real Redis channel layer; the delivery task then records it and fans it out without
sending it again, and pushes it itself whenever that push did not happen."""

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import channel_layers
from django.utils import timezone

from approvals import delivery
from approvals.models import ApprovalRequest
from approvals.services import approval_deny, auth_req_id_hash
from audit.models import AuditEvent
from config.celery import app as celery_app
from consent.models import ScopePolicy
from consent.services import AuthContext
from tests.approvals.conftest import Agent
from tests.conftest import Scenario

pytestmark = [pytest.mark.django_db(transaction=True)]
T = TypeVar("T")


class _Queued:
    """Records what is queued of approvals.deliver_prompt, instead of sending it to a worker."""

    def __init__(self, task: Any) -> None:
        self.task = task  # the real one, to run what was queued
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any] | None]] = []

    def apply_async(
        self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        self.calls.append((args, kwargs))

    def run_them(self) -> None:
        """Run what was queued, as a worker would (the real task, in this process)."""
        for args, kwargs in self.calls:
            self.task.apply(args=args, kwargs=kwargs or {}, throw=True)


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> _Queued:
    task = celery_app.tasks["approvals.deliver_prompt"]
    recorded = _Queued(task)
    monkeypatch.setattr(task, "apply_async", recorded.apply_async)
    return recorded


class _Inbox:
    """A channel in the user's group, as an open inbox has, on a channel layer and an event loop of
    its own (a thread): the process's shared layer keeps locks bound to the loop that used them, and
    the services push through it from theirs (``approvals.delivery``)."""

    def __init__(self, user_id: int) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="test-inbox", daemon=True).start()
        self.layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        self.group = delivery.user_group(user_id)
        self.channel = self._run(self.layer.new_channel())
        self._run(self.layer.group_add(self.group, self.channel))

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next frame, or None when none comes within ``timeout`` seconds."""
        try:
            frame: dict[str, Any] = self._run(
                asyncio.wait_for(self.layer.receive(self.channel), timeout), timeout + 10
            )
        except TimeoutError:
            return None
        return frame

    def close(self) -> None:
        self._run(self.layer.group_discard(self.group, self.channel))
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def inbox(scenario: Scenario) -> Iterator[_Inbox]:
    opened = _Inbox(scenario.user.pk)
    yield opened
    opened.close()


def _approval(response: Any) -> ApprovalRequest:
    assert response.status_code == 200, response.content
    return ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(response.json()["auth_req_id"]))


def test_a_new_prompt_reaches_open_inboxes_before_any_worker_runs(
    agent: Agent, scenario: Scenario, queued: _Queued, inbox: _Inbox
) -> None:
    approval = _approval(agent.ask())

    frame = inbox.receive(5)
    assert frame is not None and frame["type"] == "approval.upsert"
    assert str(approval.pk) in frame["text"] and "Acme Office Supply" in frame["text"]
    [(args, kwargs)] = queued.calls
    assert args == (str(approval.pk),) and kwargs is not None and kwargs["pushed"] is True
    approval.refresh_from_db()
    assert approval.delivered_at is None  # recorded by the task, as before

    queued.run_them()
    assert inbox.receive(0.5) is None  # the task did not send it again
    approval.refresh_from_db()
    assert approval.delivered_at is not None


def test_when_the_direct_push_fails_the_task_pushes_the_prompt(
    agent: Agent, scenario: Scenario, queued: _Queued, monkeypatch: pytest.MonkeyPatch, inbox: _Inbox
) -> None:
    real_send = delivery.send_to_user

    def redis_gone(user_id: object, message: dict[str, Any], *, timeout: float) -> int:
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(delivery, "send_to_user", redis_gone)
    approval = _approval(agent.ask())
    assert queued.calls == [((str(approval.pk),), None)]
    assert inbox.receive(0.5) is None

    monkeypatch.setattr(delivery, "send_to_user", real_send)
    queued.run_them()
    frame = inbox.receive(5)
    assert frame is not None and str(approval.pk) in frame["text"]
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.PENDING and approval.delivered_at is not None


def test_a_prompt_a_quorum_decides_is_left_to_the_task(
    agent: Agent, scenario: Scenario, ledger_policy: ScopePolicy, queued: _Queued, inbox: _Inbox
) -> None:
    # Each approver's inbox is told where the quorum stands for that person: not one shared frame.
    ScopePolicy.objects.filter(pk=ledger_policy.pk).update(quorum=2)

    approval = _approval(agent.ask())

    assert queued.calls == [((str(approval.pk),), None)]
    assert inbox.receive(0.5) is None
    queued.run_them()
    frame = inbox.receive(5)
    assert frame is not None and '"quorum"' in frame["text"]


def test_a_prompt_answered_before_the_task_ran_is_recorded_as_delivered_when_it_was_pushed(
    agent: Agent, scenario: Scenario, queued: _Queued, inbox: _Inbox
) -> None:
    before = timezone.now()
    approval = _approval(agent.ask())
    assert inbox.receive(5) is not None
    after_push = timezone.now()
    approval_deny(approval_id=approval.pk, user=scenario.user, auth=AuthContext(timezone.now(), ["pwd"]))
    removal = inbox.receive(5)
    assert removal is not None and removal["type"] == "approval.remove"

    queued.run_them()  # the worker comes to it only now
    assert inbox.receive(0.5) is None  # and sends nothing

    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.DENIED
    assert approval.delivered_at is not None and before <= approval.delivered_at <= after_push
    assert (
        AuditEvent.objects.filter(event="approval.delivered", detail__approval_id=str(approval.pk)).count()
        == 1
    )

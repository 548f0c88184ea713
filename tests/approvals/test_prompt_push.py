"""A new prompt is pushed to the user's open inboxes by the process that committed the request,
through the real Redis channel layer; the delivery task then records it and fans it out without
sending it again, and pushes it itself whenever that push did not happen."""

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
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


def _listen(user_id: int) -> Callable[[float], dict[str, Any] | None]:
    """A channel in the user's group, as an open inbox has; returns a reader of its next frame
    (None when none comes within the timeout)."""
    layer = get_channel_layer()
    assert layer is not None
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(delivery.user_group(user_id), channel)

    async def receive(timeout: float) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(layer.receive(channel), timeout)
        except TimeoutError:
            return None

    return async_to_sync(receive)


def _approval(response: Any) -> ApprovalRequest:
    assert response.status_code == 200, response.content
    return ApprovalRequest.objects.get(auth_req_id_hash=auth_req_id_hash(response.json()["auth_req_id"]))


def test_a_new_prompt_reaches_open_inboxes_before_any_worker_runs(
    agent: Agent, scenario: Scenario, queued: _Queued
) -> None:
    receive = _listen(scenario.user.pk)

    approval = _approval(agent.ask())

    frame = receive(5)
    assert frame is not None and frame["type"] == "approval.upsert"
    assert str(approval.pk) in frame["text"] and "Acme Office Supply" in frame["text"]
    [(args, kwargs)] = queued.calls
    assert args == (str(approval.pk),) and kwargs is not None and kwargs["pushed"] is True
    approval.refresh_from_db()
    assert approval.delivered_at is None  # recorded by the task, as before

    queued.run_them()
    assert receive(0.5) is None  # the task did not send it again
    approval.refresh_from_db()
    assert approval.delivered_at is not None


def test_when_the_direct_push_fails_the_task_pushes_the_prompt(
    agent: Agent, scenario: Scenario, queued: _Queued, monkeypatch: pytest.MonkeyPatch
) -> None:
    receive = _listen(scenario.user.pk)
    real_send = delivery.send_to_user

    def redis_gone(user_id: object, message: dict[str, Any], *, timeout: float) -> int:
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(delivery, "send_to_user", redis_gone)
    approval = _approval(agent.ask())
    assert queued.calls == [((str(approval.pk),), None)]
    assert receive(0.5) is None

    monkeypatch.setattr(delivery, "send_to_user", real_send)
    queued.run_them()
    frame = receive(5)
    assert frame is not None and str(approval.pk) in frame["text"]
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.PENDING and approval.delivered_at is not None


def test_a_prompt_a_quorum_decides_is_left_to_the_task(
    agent: Agent, scenario: Scenario, ledger_policy: ScopePolicy, queued: _Queued
) -> None:
    # Each approver's inbox is told where the quorum stands for that person: not one shared frame.
    ScopePolicy.objects.filter(pk=ledger_policy.pk).update(quorum=2)
    receive = _listen(scenario.user.pk)

    approval = _approval(agent.ask())

    assert queued.calls == [((str(approval.pk),), None)]
    assert receive(0.5) is None
    queued.run_them()
    frame = receive(5)
    assert frame is not None and '"quorum"' in frame["text"]


def test_a_prompt_answered_before_the_task_ran_is_recorded_as_delivered_when_it_was_pushed(
    agent: Agent, scenario: Scenario, queued: _Queued
) -> None:
    receive = _listen(scenario.user.pk)
    before = timezone.now()
    approval = _approval(agent.ask())
    assert receive(5) is not None
    after_push = timezone.now()
    approval_deny(approval_id=approval.pk, user=scenario.user, auth=AuthContext(timezone.now(), ["pwd"]))

    queued.run_them()  # the worker comes to it only now

    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.DENIED
    assert approval.delivered_at is not None and before <= approval.delivered_at <= after_push
    assert (
        AuditEvent.objects.filter(event="approval.delivered", detail__approval_id=str(approval.pk)).count()
        == 1
    )

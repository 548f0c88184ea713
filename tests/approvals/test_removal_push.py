"""The news that a prompt left the pending list is pushed by the process that committed the change,
through the real Redis channel layer; the Celery task carries it only when that push fails."""

from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from approvals import delivery
from approvals.models import ApprovalRequest
from approvals.services import approval_deny, approval_expire
from config.celery import app as celery_app
from consent.models import ScopePolicy
from tests.approvals.support import auth_now, ledger_entry, request_approval, session_grant
from tests.conftest import Scenario

pytestmark = [pytest.mark.django_db(transaction=True)]


class _Recorded:
    """Stands in for the push_removal task in Celery's registry: records what would be queued."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def apply_async(self, args: tuple[Any, ...] = (), **options: Any) -> None:
        self.ids.append(str(args[0]))


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> _Recorded:
    recorded = _Recorded()
    for name in ("approvals.push_removal", "approvals.deliver_prompt"):
        monkeypatch.setitem(
            celery_app.tasks, name, recorded if name == "approvals.push_removal" else _Recorded()
        )
    return recorded


def _listen(user_id: int) -> Callable[[], dict[str, Any]]:
    """A channel in the user's group, as an open inbox has; returns a function reading its next frame."""
    layer = get_channel_layer()
    assert layer is not None
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(delivery.user_group(user_id), channel)

    def receive() -> dict[str, Any]:
        return async_to_sync(layer.receive)(channel)

    return receive


def test_a_decision_reaches_open_inboxes_without_a_task(
    scenario: Scenario, ledger_policy: ScopePolicy, queued: _Recorded
) -> None:
    approval, _ = request_approval(session_grant(scenario), [ledger_entry()])
    receive = _listen(scenario.user.pk)

    approval_deny(approval_id=approval.pk, user=scenario.user, auth=auth_now())

    message = receive()
    assert message["type"] == "approval.remove"
    assert '"status":"denied"' in message["text"] and str(approval.pk) in message["text"]
    assert queued.ids == []  # nothing for a worker to do


def test_an_expiry_found_by_the_sweep_reaches_open_inboxes(
    scenario: Scenario, ledger_policy: ScopePolicy, queued: _Recorded
) -> None:
    approval, _ = request_approval(session_grant(scenario), [ledger_entry()])
    ApprovalRequest.objects.filter(pk=approval.pk).update(expires_at=approval.created)
    receive = _listen(scenario.user.pk)

    assert approval_expire(approval_id=approval.pk) is True

    assert '"status":"expired"' in receive()["text"]
    assert queued.ids == []


def test_when_the_direct_push_fails_the_task_carries_the_news(
    scenario: Scenario, ledger_policy: ScopePolicy, queued: _Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    approval, _ = request_approval(session_grant(scenario), [ledger_entry()])

    def redis_gone(user_id: object, message: dict[str, Any], *, timeout: float) -> None:
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(delivery, "send_to_user", redis_gone)
    approval_deny(approval_id=approval.pk, user=scenario.user, auth=auth_now())

    assert queued.ids == [str(approval.pk)]
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.DENIED  # the decision stands either way


def test_nothing_is_pushed_for_a_transaction_that_rolls_back(
    scenario: Scenario, ledger_policy: ScopePolicy, queued: _Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import transaction

    approval, _ = request_approval(session_grant(scenario), [ledger_entry()])
    sent = []
    monkeypatch.setattr(delivery, "send_to_user", lambda *a, **k: sent.append(a))
    with pytest.raises(RuntimeError), transaction.atomic():
        approval_deny(approval_id=approval.pk, user=scenario.user, auth=auth_now())
        raise RuntimeError("rolled back")
    assert sent == [] and queued.ids == []
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.PENDING

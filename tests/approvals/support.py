"""Builders shared by the approval tests: real rows made through the services, no shortcuts.

``session_grant`` and ``request_approval`` go through ``grant_create`` and
``approval_request_create`` exactly as the consent screen and the CIBA endpoint do;
only the HTTP layer is skipped. ``Outbox`` stands in for Celery and the channel layer: it
records every task the services queue on commit and, for the two push tasks, runs the real
task body; every websocket send (the tasks' and the services' own pushes after commit) is
recorded instead of sent to Redis.
"""

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from approvals import delivery as approval_delivery
from approvals import rar
from approvals import tasks as approval_tasks
from approvals.ciba import BackchannelRequest
from approvals.models import ApprovalRequest
from approvals.services import approval_request_create, auth_req_id_for
from config.celery import app as celery_app
from consent.models import Agent, ResourceServer, ScopePolicy, SessionGrant
from consent.services import AuthContext, grant_create
from tests.conftest import Scenario

LEDGER_SCOPE = "ledger:write"
ALL_SCOPES = ["catalog:read", "budget:read", LEDGER_SCOPE]


def ledger_entry(amount: str = "4250.00", **extra: Any) -> dict[str, Any]:
    return {
        "type": "ledger_entry",
        "actions": ["append"],
        "purchase_order": "PO-2026-0142",
        "vendor": "Acme Office Supply",
        "amount": amount,
        "currency": "USD",
        **extra,
    }


def auth_now(amr: tuple[str, ...] = ("pwd",)) -> AuthContext:
    return AuthContext(auth_time=timezone.now(), amr=list(amr))


def session_grant(
    scenario: Scenario,
    *,
    user: User | None = None,
    agent: Agent | None = None,
    scopes: Iterable[str] | None = None,
    lifetime: int = 3600,
) -> SessionGrant:
    """The consent event, as the consent screen's Allow creates it."""
    return grant_create(
        user=user or scenario.user,
        agent=agent or scenario.agent,
        scopes=list(scopes or ALL_SCOPES),
        lifetime=lifetime,
        auth=auth_now(),
        consent_shown={"test": True},
    )


def backchannel_request(
    grant: SessionGrant,
    details: list[dict[str, Any]] | None = None,
    *,
    window: int | None = None,
    binding_message: str = "",
) -> BackchannelRequest:
    policy = ScopePolicy.objects.get(name=LEDGER_SCOPE)
    details = details if details is not None else [ledger_entry()]
    return BackchannelRequest(
        agent=grant.agent,
        grant=grant,
        scope=policy.name,
        system=policy.description,
        auto_approve_rule=policy.auto_approve_rule,
        authorization_details=details,
        action_hash=rar.action_hash(details),
        binding_message=binding_message,
        window_seconds=window or policy.approval_window,
        delivery_mode="poll",
        client_notification_token="",
    )


def request_approval(
    grant: SessionGrant, details: list[dict[str, Any]] | None = None, **kwargs: Any
) -> tuple[ApprovalRequest, bool]:
    """A validated CIBA request persisted by the service. Returns (approval, created)."""
    return approval_request_create(req=backchannel_request(grant, details, **kwargs))


def auth_req_id(approval: ApprovalRequest) -> str:
    return auth_req_id_for(approval.pk)


def ledger_rs(scenario: Scenario) -> ResourceServer:
    return ResourceServer.objects.get(client_id=scenario.ledger_client_id)


@dataclass
class Outbox:
    """What the services handed to Celery (``queued``) and what reached a browser (``sent``)."""

    queued: list[tuple[str, str]] = field(default_factory=list)
    sent: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def queued_for(self, approval_id: object, name: str | None = None) -> list[str]:
        return [n for n, pk in self.queued if pk == str(approval_id) and (name is None or n == name)]

    def prompts_sent(self) -> list[dict[str, Any]]:
        return [m for _, m in self.sent if m.get("type") == "approval.upsert"]

    def removals_for(self, approval_id: object) -> list[str]:
        """The statuses open inboxes were told the request left the pending list with."""
        return [
            m["status"]
            for _, m in self.sent
            if m.get("type") == "approval.remove" and m["id"] == str(approval_id)
        ]


class _QueuedTask:
    """Stands in for one Celery task in the app's registry; ``apply_async`` records and maybe runs it."""

    def __init__(self, name: str, real: Callable[..., Any], outbox: Outbox, run: bool) -> None:
        self.name, self.real, self.outbox, self.run = name, real, outbox, run

    def apply_async(
        self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        self.outbox.queued.append((self.name, str(args[0])))
        if self.run:
            self.real(*args, **(kwargs or {}))


def install_outbox(monkeypatch: pytest.MonkeyPatch, *, run_pushes: bool = True) -> Outbox:
    outbox = Outbox()

    def record(user_id: int | str, message: dict[str, Any], **kwargs: Any) -> None:
        outbox.sent.append((int(user_id), message))

    def push_now(
        user_id: int | str, message: dict[str, Any]
    ) -> bool:  # the services' own push after commit (approvals.delivery.push_now)
        record(user_id, message)
        return True

    monkeypatch.setattr(approval_tasks, "send_to_user", record)
    monkeypatch.setattr(approval_delivery, "push_now", push_now)
    for name in ("deliver_prompt", "push_removal", "notify_agent", "expire_approval"):
        # The services queue tasks by their registered name (approvals.services._after_commit); the
        # sweeps in approvals.tasks call them by reference.
        real = getattr(approval_tasks, name)._get_current_object()  # shared_task: a proxy into the registry
        fake = _QueuedTask(name, real, outbox, run_pushes and name in ("deliver_prompt", "push_removal"))
        monkeypatch.setitem(celery_app.tasks, real.name, fake)
        monkeypatch.setattr(approval_tasks, name, fake)
    return outbox


# --- races on PostgreSQL: real threads, each with its own database connection ---------------------


def race(n: int, call: Callable[..., Any]) -> list[tuple[str, Any]]:
    """Run ``call(i)`` in n threads released together; returns ("ok", result) or ("error", exc) per thread."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        try:
            connection.ensure_connection()  # connect before the barrier: the race is the service call
            barrier.wait(timeout=60)
            results[i] = ("ok", call(i))
        except BaseException as exc:  # noqa: BLE001 - every outcome is inspected by the test
            results[i] = ("error", exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,), name=f"race-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a racing thread never finished (deadlock?)"
    return results


def wins(results: list[tuple[str, Any]]) -> list[Any]:
    return [value for kind, value in results if kind == "ok"]


def errors(results: list[tuple[str, Any]]) -> list[BaseException]:
    return [value for kind, value in results if kind == "error"]

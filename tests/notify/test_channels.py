"""Each channel against a real server on loopback: a push service that checks VAPID and decrypts
(RFC 8030/8291/8292), an SMTP server (aiosmtpd), a webhook receiver that checks the Standard
Webhooks signature. The tasks run in this process; what they would queue is recorded."""

import base64
import email
import email.policy
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from django.contrib.auth.models import User
from django.test import Client
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from approvals.models import ApprovalRequest
from approvals.notify import tasks as notify_tasks
from approvals.notify.models import NotificationPreference, PromptDelivery, PushSubscription
from approvals.notify.services import organisation_webhook_create
from approvals.notify.webpush import vapid_key
from approvals.services import auth_req_id_for
from audit.models import AuditEvent
from tests.conftest import Scenario
from tests.live import free_port
from tests.notify.conftest import Queue
from tests.notify.pushservice import PushService

pytestmark = pytest.mark.django_db

HEADLINE = "Append 4250.00 USD to Acme Office Supply (PO-2026-0142) — Financial ledger"


def _device(user: User, service: PushService, name: str) -> PushSubscription:
    endpoint, keys = service.subscribe(name)
    sub = keys.subscription(endpoint)
    client = Client()
    client.force_login(user)
    response = client.post("/approvals/devices/subscribe/", json.dumps(sub), content_type="application/json")
    assert response.status_code == 201, response.content
    return PushSubscription.objects.get(pk=response.json()["id"])


def _deliveries(approval: ApprovalRequest, channel: str) -> list[tuple[str, str]]:
    return list(
        PromptDelivery.objects.filter(approval=approval, channel=channel).values_list("outcome", "error")
    )


# --- Web Push ---------------------------------------------------------------------------------------


def test_a_push_reaches_the_device_signed_and_encrypted(
    scenario: Scenario, approval: ApprovalRequest, loopback_push: None
) -> None:
    with PushService() as service:
        device = _device(scenario.user, service, "laptop")
        notify_tasks.push_prompt.apply(args=(str(approval.pk), str(device.pk)))
        (got,) = service.wait_for(1)
        assert not service.problems
    # The service verified the JWT with this key: the one the page hands browsers to subscribe with.
    assert got.vapid_key == vapid_key().public_key
    assert got.claims["aud"] == service.origin
    assert got.payload == {
        "id": str(approval.pk),
        "title": "Procurement Agent asks for your approval",
        "body": HEADLINE,
        "url": f"/approvals/{approval.pk}/?via=push",
        "expires_at": approval.expires_at.isoformat(),
    }
    assert auth_req_id_for(approval.pk) not in json.dumps(got.payload)
    assert _deliveries(approval, "push") == [("delivered", "")]
    (event,) = AuditEvent.objects.filter(event="approval.reached")
    assert event.detail["channel"] == "push" and event.grant_id == str(approval.grant_id)
    # Run twice (a redelivered task): nothing is sent again.
    notify_tasks.push_prompt.apply(args=(str(approval.pk), str(device.pk)))
    assert len(service.received) == 1


def test_an_expired_subscription_is_removed_and_audited(
    scenario: Scenario, approval: ApprovalRequest, loopback_push: None
) -> None:
    with PushService() as service:
        device = _device(scenario.user, service, "old-phone")
        service.answer("old-phone", 410)
        notify_tasks.push_prompt.apply(args=(str(approval.pk), str(device.pk)))
        assert not service.received
    assert not PushSubscription.objects.filter(pk=device.pk).exists()
    (gone,) = AuditEvent.objects.filter(event="push.device_expired")
    assert gone.detail["device_id"] == str(device.pk) and "410" in gone.detail["error"]
    assert _deliveries(approval, "push") == [("failed", "push service answered HTTP 410")]
    assert AuditEvent.objects.filter(event="approval.not_reached").count() == 1
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"


def test_a_push_service_error_is_retried_with_backoff(
    scenario: Scenario, approval: ApprovalRequest, loopback_push: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    retries: list[int] = []

    def retry(self_task: Any = None, countdown: int = 0, **kwargs: Any) -> Exception:
        retries.append(countdown)
        return RuntimeError("retry")

    with PushService() as service:
        device = _device(scenario.user, service, "busy")
        service.answer("busy", 503)
        monkeypatch.setattr(notify_tasks.push_prompt, "retry", retry)
        result = notify_tasks.push_prompt.apply(args=(str(approval.pk), str(device.pk)))
        assert isinstance(result.result, RuntimeError) and retries == [2]
        assert _deliveries(approval, "push") == []  # not failed yet: it will be tried again
        monkeypatch.undo()
        notify_tasks.push_prompt.apply(args=(str(approval.pk), str(device.pk)))  # the retry: answered 201
        assert len(service.wait_for(1)) == 1
    assert _deliveries(approval, "push") == [("delivered", "")]


# --- the fan-out ------------------------------------------------------------------------------------


def test_the_inbox_delivery_fans_the_prompt_out_once(
    scenario: Scenario,
    approval: ApprovalRequest,
    queued: Queue,
    loopback_push: None,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    from approvals import tasks as approval_tasks

    monkeypatch.setattr(approval_tasks, "send_to_user", lambda user_id, message: 1)
    with PushService() as service:
        device = _device(scenario.user, service, "laptop")
    hook, _ = organisation_webhook_create(name="Ops", url="http://127.0.0.1:9/hook")
    queued.record("approvals.expire_approval")
    with django_capture_on_commit_callbacks(execute=True):
        approval_tasks.deliver_prompt(str(approval.pk))
        approval_tasks.deliver_prompt(str(approval.pk))  # redelivered: no second fan-out
    # No inbox socket was open: the websocket channel says so (the laptop is closed).
    assert _deliveries(approval, "websocket") == [("failed", "no open inbox")]
    # The fan-out ran in the delivery task itself, once: one task per device, webhook and the mailbox.
    assert queued.named("approvals.notify_prompt") == []
    assert queued.named("approvals.push_prompt") == [(str(approval.pk), str(device.pk))]
    assert queued.named("approvals.webhook_prompt") == [(str(approval.pk), str(hook.pk))]
    ((_, args, options),) = [c for c in queued.calls if c[0] == "approvals.email_prompt"]
    assert options == {"countdown": 30}  # "when no device is reachable": checked after the others went


def test_a_prompt_an_open_inbox_took_queues_no_email_fallback(
    scenario: Scenario,
    approval: ApprovalRequest,
    queued: Queue,
    loopback_push: None,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    from approvals import tasks as approval_tasks
    from approvals.notify import inbox

    monkeypatch.setattr(approval_tasks, "send_to_user", lambda user_id, message: 1)
    monkeypatch.setattr(inbox, "open_inboxes", lambda user_id: 1)
    with PushService() as service:
        device = _device(scenario.user, service, "laptop")
    with django_capture_on_commit_callbacks(execute=True):
        approval_tasks.deliver_prompt(str(approval.pk))
    assert _deliveries(approval, "websocket") == [("delivered", "")]
    # The fallback would find the prompt reached and send nothing, so it is not queued; devices still are.
    assert queued.named("approvals.email_prompt") == []
    assert queued.named("approvals.push_prompt") == [(str(approval.pk), str(device.pk))]
    # The old task name still runs a fan-out already queued (and, knowing nothing, keeps the fallback).
    with django_capture_on_commit_callbacks(execute=True):
        assert queued.real["approvals.notify_prompt"](str(approval.pk)) == 2
    assert len(queued.named("approvals.email_prompt")) == 1


# --- email --------------------------------------------------------------------------------------------


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 OK"


@pytest.fixture
def smtp(settings: Settings) -> Iterator[_Mailbox]:
    mailbox = _Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", port
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    try:
        yield mailbox
    finally:
        controller.stop()


def test_the_email_carries_the_headline_and_a_link_that_approves_nothing(
    scenario: Scenario, approval: ApprovalRequest, smtp: _Mailbox
) -> None:
    scenario.user.email = "officer@example.org"
    scenario.user.save()
    NotificationPreference.objects.create(user=scenario.user, email="always")
    notify_tasks.email_prompt.apply(args=(str(approval.pk),))
    (mail,) = smtp.messages
    assert mail["To"] == "officer@example.org" and HEADLINE in mail["Subject"]
    text = mail.get_content()
    assert HEADLINE in text
    link = f"http://127.0.0.1:8000/approvals/{approval.pk}/?via=email"
    assert link in text
    # Nothing in it could act: no auth_req_id, no approve URL, no token of any kind.
    assert (
        auth_req_id_for(approval.pk) not in text and "/approve/" not in text and "token" not in text.lower()
    )
    assert _deliveries(approval, "email") == [("delivered", "")]

    path = link.removeprefix("http://127.0.0.1:8000")
    anonymous = Client().get(path)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/accounts/login/?next=")
    signed_in = Client()
    signed_in.force_login(scenario.user)
    opened = signed_in.get(path)
    assert opened.status_code == 302 and opened["Location"] == f"/approvals/#prompt-{approval.pk}"
    signed_in.get(path)  # opened twice: recorded once
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"  # a GET decides nothing
    assert _deliveries(approval, "email") == [("delivered", ""), ("clicked", "")]
    assert AuditEvent.objects.filter(event="approval.opened").count() == 1
    history = signed_in.get(f"/approvals/#prompt-{approval.pk}")
    assert f'id="prompt-{approval.pk}"'.encode() in history.content


def test_unreachable_email_waits_for_the_other_channels(
    scenario: Scenario, approval: ApprovalRequest, smtp: _Mailbox
) -> None:
    scenario.user.email = "officer@example.org"
    scenario.user.save()
    PromptDelivery.objects.create(approval=approval, channel="push", target="x", outcome="delivered")
    notify_tasks.email_prompt.apply(args=(str(approval.pk),))  # default preference: unreachable
    assert smtp.messages == []
    PromptDelivery.objects.all().delete()
    notify_tasks.email_prompt.apply(args=(str(approval.pk),))
    assert len(smtp.messages) == 1
    NotificationPreference.objects.create(user=scenario.user, email="never")
    PromptDelivery.objects.all().delete()
    notify_tasks.email_prompt.apply(args=(str(approval.pk),))
    assert len(smtp.messages) == 1


def test_another_users_prompt_link_is_a_404(
    scenario: Scenario, approval: ApprovalRequest, django_user_model: type[User]
) -> None:
    other = django_user_model.objects.create_user("mallory", password="x" * 12)
    client = Client()
    client.force_login(other)
    assert client.get(f"/approvals/{approval.pk}/?via=email").status_code == 404
    assert not PromptDelivery.objects.filter(outcome="clicked").exists()
    assert AuditEvent.objects.filter(event="approval.open_refused", user_id=other.pk).count() == 1


# --- the organisation webhook --------------------------------------------------------------------------


class _Receiver:
    """A receiver that checks the signature as the Standard Webhooks spec tells receivers to."""

    def __init__(self, secret: str) -> None:
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = receiver.check({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(204 if ok else 401)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check(self, headers: dict[str, str], body: bytes) -> bool:
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest()).decode()
        fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
        if not fresh or f"v1,{expected}" not in headers["webhook-signature"].split(" "):
            self.refused += 1
            return False
        self.headers.append(headers)
        self.bodies.append(json.loads(body))
        return True


def test_the_webhook_is_signed_and_carries_no_power_to_approve(
    scenario: Scenario, approval: ApprovalRequest
) -> None:
    hook, secret = organisation_webhook_create(name="Ops", url="http://127.0.0.1:9/")
    assert secret.startswith("whsec_")
    receiver = _Receiver(secret)
    hook.url = receiver.url
    hook.save()
    try:
        notify_tasks.webhook_prompt.apply(args=(str(approval.pk), str(hook.pk)))
    finally:
        receiver.server.shutdown()
    assert receiver.refused == 0
    (body,) = receiver.bodies
    assert receiver.headers[0]["webhook-id"] == f"msg_{approval.pk}_{hook.pk}"
    assert body["type"] == "approval.requested"
    assert body["data"]["headline"] == HEADLINE
    assert body["data"]["url"] == f"http://127.0.0.1:8000/approvals/{approval.pk}/?via=webhook"
    assert auth_req_id_for(approval.pk) not in json.dumps(body)
    assert _deliveries(approval, "webhook") == [("delivered", "")]


def test_a_receiver_that_refuses_the_signature_is_recorded_as_failed(
    scenario: Scenario, approval: ApprovalRequest
) -> None:
    hook, _ = organisation_webhook_create(name="Ops", url="http://127.0.0.1:9/")
    receiver = _Receiver("whsec_" + base64.b64encode(b"another key entirely, 32 bytes!!").decode())
    hook.url = receiver.url
    hook.save()
    try:
        notify_tasks.webhook_prompt.apply(args=(str(approval.pk), str(hook.pk)))
    finally:
        receiver.server.shutdown()
    assert receiver.refused == 1
    assert _deliveries(approval, "webhook") == [("failed", "receiver answered HTTP 401")]


def test_a_webhook_for_an_organisation_reaches_only_its_members(
    scenario: Scenario,
    approval: ApprovalRequest,
    queued: Queue,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    from django.contrib.auth.models import Group

    group = Group.objects.create(name="Finance")
    organisation_webhook_create(name="Finance hook", url="http://127.0.0.1:9/", group=group)
    with django_capture_on_commit_callbacks(execute=True):
        queued.real["approvals.notify_prompt"](str(approval.pk))
    assert queued.named("approvals.webhook_prompt") == []
    scenario.user.groups.add(group)
    with django_capture_on_commit_callbacks(execute=True):
        queued.real["approvals.notify_prompt"](str(approval.pk))
    assert len(queued.named("approvals.webhook_prompt")) == 1

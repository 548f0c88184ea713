"""The admin's side: the VAPID key and webhooks from a shell, and push turned off."""

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from pytest_django import Settings

from approvals.notify.models import OrganisationWebhook, VapidKey
from approvals.notify.webhooks import sign, verify
from audit.models import AuditEvent
from tests.conftest import Scenario
from tests.notify.pushservice import BrowserKeys

pytestmark = pytest.mark.django_db


def _run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_vapid_key_is_made_once_and_rotates() -> None:
    first = json.loads(_run("vapid_key", "--json"))
    assert len(first["public_key"]) == 87 and first["contact"] == "mailto:countersign@127.0.0.1"
    assert json.loads(_run("vapid_key", "--json")) == first
    rotated = json.loads(_run("vapid_key", "--rotate", "--json"))
    assert rotated["public_key"] != first["public_key"]
    assert VapidKey.objects.filter(active=True).count() == 1 and VapidKey.objects.count() == 2
    assert AuditEvent.objects.filter(event="vapid_key.rotated").count() == 1


def test_webhook_create_prints_its_secret_once() -> None:
    made = json.loads(_run("webhook_create", "--name", "Ops", "--url", "https://hooks.example/cs", "--json"))
    assert made["secret"].startswith("whsec_")
    hook = OrganisationWebhook.objects.get()
    assert hook.secret == made["secret"] and hook.group is None
    with pytest.raises(CommandError):
        _run("webhook_create", "--name", "Bad", "--url", "ftp://hooks.example/cs")
    with pytest.raises(CommandError):
        _run("webhook_create", "--name", "Nobody", "--url", "https://hooks.example/x", "--group", "Nope")
    assert OrganisationWebhook.objects.count() == 1


def test_a_signature_verifies_only_with_its_secret_id_and_body() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"type":"approval.requested"}'
    import time

    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": "v0,xyz " + sign(secret=secret, msg_id="msg_1", timestamp=now, body=body),
    }
    assert verify(secret=secret, headers=headers, body=body)
    assert not verify(secret=secret, headers=headers, body=body + b" ")
    assert not verify(secret=secret, headers={**headers, "webhook-id": "msg_2"}, body=body)
    assert not verify(secret="whsec_" + "A" * 32, headers=headers, body=body)
    stale = {**headers, "webhook-timestamp": str(now - 3600)}
    stale["webhook-signature"] = sign(secret=secret, msg_id="msg_1", timestamp=now - 3600, body=body)
    assert not verify(secret=secret, headers=stale, body=body)


def test_with_push_off_the_page_offers_no_device_and_the_endpoint_is_gone(
    scenario: Scenario, settings: Settings
) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "PUSH_ENABLED": False}
    client = Client()
    client.force_login(scenario.user)
    assert b"Notify me on this device" not in client.get("/approvals/devices/").content
    body = json.dumps(BrowserKeys().subscription("https://push.example.net/s/1"))
    assert (
        client.post("/approvals/devices/subscribe/", body, content_type="application/json").status_code == 404
    )

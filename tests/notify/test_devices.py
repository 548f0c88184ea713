"""Devices: a browser's push subscription kept through the endpoint the inbox's script uses, and
every refusal (malformed, oversized, foreign device) clear, changing nothing, audited once."""

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from pytest_django import Settings

from approvals.notify.models import PushSubscription
from audit.models import AuditEvent
from tests.conftest import ClientResponse, Scenario
from tests.notify.pushservice import BrowserKeys

pytestmark = pytest.mark.django_db

SUBSCRIBE = "/approvals/devices/subscribe/"


def _client(user: User, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def _post(client: Client, body: object, **headers: Any) -> ClientResponse:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(SUBSCRIBE, data, content_type="application/json", **headers)


def _audits(event: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event=event))


def test_a_browser_subscribes_and_sees_and_removes_its_device(
    scenario: Scenario, loopback_push: None
) -> None:
    client = _client(scenario.user)
    keys = BrowserKeys()
    response = _post(client, keys.subscription("http://127.0.0.1:9/push/a"), HTTP_X_DEVICE_LABEL="Linux")
    assert response.status_code == 201, response.content
    device = PushSubscription.objects.get()
    assert response.json() == {"id": str(device.pk), "created": True}
    assert (device.user, device.p256dh, device.label) == (scenario.user, keys.p256dh, "Linux")
    # The same browser again (a re-subscription) updates its keys instead of adding a device.
    again = BrowserKeys()
    assert _post(client, again.subscription("http://127.0.0.1:9/push/a")).status_code == 200
    assert PushSubscription.objects.get().p256dh == again.p256dh
    assert len(_audits("push.subscribed")) == 1

    page = client.get("/approvals/devices/")
    assert page.status_code == 200 and b"Linux" in page.content
    assert b"Notify me on this device" in page.content and b'data-vapid-key="B' in page.content
    assert client.post(f"/approvals/devices/{device.pk}/remove/").status_code == 302
    assert not PushSubscription.objects.exists()
    assert len(_audits("push.unsubscribed")) == 1


def test_subscribing_needs_a_session_and_the_csrf_token(scenario: Scenario, loopback_push: None) -> None:
    body = BrowserKeys().subscription("http://127.0.0.1:9/push/a")
    assert _post(Client(), body).status_code == 302  # to the login page
    assert _post(_client(scenario.user, enforce_csrf_checks=True), body).status_code == 403
    assert not PushSubscription.objects.exists()


def _bad_subscriptions() -> list[tuple[str, object]]:
    good = BrowserKeys().subscription("https://push.example.net/s/1")
    return [
        ("not JSON", "{nope"),
        ("no keys", {"endpoint": good["endpoint"]}),
        ("http endpoint", {**good, "endpoint": "http://push.example.net/s/1"}),
        ("javascript endpoint", {**good, "endpoint": "javascript:alert(1)"}),
        ("credentials in endpoint", {**good, "endpoint": "https://u:p@push.example.net/s/1"}),
        ("short auth", {**good, "keys": {**good["keys"], "auth": "AAAA"}}),
        ("not a point", {**good, "keys": {**good["keys"], "p256dh": "BA" + "A" * 85}}),
        ("compressed point", {**good, "keys": {**good["keys"], "p256dh": "Ag" + "A" * 41}}),
        ("keys not strings", {**good, "keys": {"p256dh": 5, "auth": ["x"]}}),
        ("nested deeply", "[" * 2000 + "]" * 2000),
        ("a list", [good]),
    ]


@pytest.mark.parametrize(("case", "body"), _bad_subscriptions(), ids=[c for c, _ in _bad_subscriptions()])
def test_a_malformed_subscription_is_refused_changes_nothing_and_is_audited_once(
    scenario: Scenario, case: str, body: object
) -> None:
    response = _post(_client(scenario.user), body)
    assert response.status_code == 400, case
    assert response.json()["error"] == "invalid_request"
    assert response.json()["reason"] == "push_subscription_invalid"
    assert not PushSubscription.objects.exists()
    (refusal,) = _audits("push.subscribe_refused")
    assert refusal.outcome == "refused" and refusal.user_id == scenario.user.pk


def test_a_loopback_endpoint_is_refused_unless_the_deployment_allows_it(scenario: Scenario) -> None:
    response = _post(_client(scenario.user), BrowserKeys().subscription("http://127.0.0.1:9/push/a"))
    assert response.status_code == 400 and response.json()["reason"] == "push_subscription_invalid"
    assert not PushSubscription.objects.exists()


def test_an_oversized_subscription_is_refused_before_parsing(scenario: Scenario, loopback_push: None) -> None:
    body = BrowserKeys().subscription("https://push.example.net/s/1")
    body["padding"] = "x" * 5000
    response = _post(_client(scenario.user), body)
    assert response.status_code == 413 and response.json()["reason"] == "push_subscription_too_large"
    assert not PushSubscription.objects.exists()
    assert len(_audits("push.subscribe_refused")) == 1


def test_the_device_limit_holds(scenario: Scenario, settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "PUSH_MAX_DEVICES_PER_USER": 1}
    client = _client(scenario.user)
    assert _post(client, BrowserKeys().subscription("https://push.example.net/s/1")).status_code == 201
    response = _post(client, BrowserKeys().subscription("https://push.example.net/s/2"))
    assert response.status_code == 409 and response.json()["reason"] == "too_many_devices"
    assert PushSubscription.objects.count() == 1


def test_another_users_device_id_is_a_404_that_changes_nothing(
    scenario: Scenario, django_user_model: type[User]
) -> None:
    other = django_user_model.objects.create_user("mallory", password="x" * 12)
    _post(_client(scenario.user), BrowserKeys().subscription("https://push.example.net/s/1"))
    device = PushSubscription.objects.get()
    mallory = _client(other)
    assert mallory.post(f"/approvals/devices/{device.pk}/remove/").status_code == 404
    response = mallory.post(f"/approvals/devices/{device.pk}/remove/", HTTP_ACCEPT="application/json")
    assert response.status_code == 404 and response.json()["reason"] == "device_not_found"
    assert mallory.post("/approvals/devices/not-a-uuid/remove/").status_code == 404
    assert PushSubscription.objects.filter(pk=device.pk).exists()
    refusals = _audits("push.remove_refused")
    assert len(refusals) == 3 and {r.user_id for r in refusals} == {other.pk}
    # A GET never removes anything.
    assert _client(scenario.user).get(f"/approvals/devices/{device.pk}/remove/").status_code == 405
    assert PushSubscription.objects.filter(pk=device.pk).exists()


def test_the_email_preference_is_the_users_choice(scenario: Scenario) -> None:
    client = _client(scenario.user)
    page = client.get("/approvals/devices/")
    assert b'value="unreachable" checked' in page.content
    assert client.post("/approvals/devices/email/", {"email": "always"}).status_code == 302
    assert b'value="always" checked' in client.get("/approvals/devices/").content
    client.post("/approvals/devices/email/", {"email": "sometimes"})
    assert b'value="always" checked' in client.get("/approvals/devices/").content
    assert len(_audits("notify.preference_refused")) == 1


def test_the_inbox_is_an_installable_app(client: Client) -> None:
    manifest = client.get("/approvals/manifest.webmanifest")
    assert manifest.status_code == 200 and manifest["Content-Type"] == "application/manifest+json"
    body = manifest.json()
    assert body["start_url"] == "/approvals/" and body["display"] == "standalone"
    for icon in body["icons"]:
        assert icon["src"].startswith("/static/countersign/icons/")
        assert client.get(icon["src"]).status_code == 200
    worker = client.get("/approvals/sw.js")
    assert worker.status_code == 200 and worker["Content-Type"].startswith("text/javascript")
    assert b'addEventListener("push"' in worker.content and b"notificationclick" in worker.content

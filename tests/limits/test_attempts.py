"""Attempt limits on the secrets people present, black-box over real HTTP: the sign-in password
(django-axes), fresh authentication before approving, TOTP codes; and the backoff itself."""

import re
import time

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice
from pytest_django import Settings

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.limits import attempts, store
from consent.models import ScopePolicy
from tests.approvals.support import request_approval, session_grant
from tests.conftest import PASSWORD, Scenario
from tests.limits.conftest import ATTEMPT_LIMITS, from_source, refusals
from tests.live import LiveStack


def _csrf(http: httpx.Client, url: str, path: str) -> str:
    page = http.get(f"{url}{path}")
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    return match.group(1) if match else http.cookies["csrftoken"]


def test_password_sign_in_locks_after_the_limit_and_says_when_to_retry(
    limited: LiveStack, scenario: Scenario
) -> None:
    limit = ATTEMPT_LIMITS["login"]["account"]
    with from_source("127.0.1.1") as http:
        wrong = []
        for _ in range(limit + 3):
            token = _csrf(http, limited.url, "/accounts/login/")
            wrong.append(
                http.post(
                    f"{limited.url}/accounts/login/",
                    data={"username": "officer", "password": "guess", "csrfmiddlewaretoken": token},
                )
            )
        token = _csrf(http, limited.url, "/accounts/login/")
        right = http.post(
            f"{limited.url}/accounts/login/",
            data={"username": "officer", "password": PASSWORD, "csrfmiddlewaretoken": token},
        )
    assert [r.status_code for r in wrong[: limit - 1]] == [200] * (limit - 1)
    assert {r.status_code for r in wrong[limit:]} == {429}
    # Locked: the right password does not sign in, and the page says when to try again.
    assert right.status_code == 429 and "sessionid" not in right.cookies
    assert re.search(r"Try again in \d+ minutes?", right.text)
    assert int(right.headers["Retry-After"]) >= 60
    assert AuditEvent.objects.filter(event="login.locked").count() == 1
    assert AuditEvent.objects.filter(event="login.failed").count() == limit - 1
    assert refusals()["locked:login"] >= 4


@pytest.fixture
def fresh_auth_approval(scenario: Scenario, ledger_policy: ScopePolicy) -> ApprovalRequest:
    ScopePolicy.objects.filter(pk=ledger_policy.pk).update(fresh_auth_seconds=60)
    approval: ApprovalRequest
    approval, _ = request_approval(session_grant(scenario))
    return approval


def _stale_session(http: httpx.Client, user: User) -> None:
    browser = Client()
    browser.force_login(user)
    session = browser.session
    session["cs_auth_time"] = time.time() - 3600
    session.save()
    assert session.session_key is not None  # saved, so it has one
    http.cookies.set("sessionid", session.session_key)


def test_fresh_authentication_is_attempt_limited(
    limited: LiveStack, scenario: Scenario, fresh_auth_approval: ApprovalRequest
) -> None:
    limit = ATTEMPT_LIMITS["fresh_auth"]["account"]
    path = f"/approvals/{fresh_auth_approval.pk}/confirm/"
    with from_source("127.0.1.2") as http:
        _stale_session(http, scenario.user)
        answers = []
        for _ in range(limit):
            token = _csrf(http, limited.url, path)
            answers.append(
                http.post(f"{limited.url}{path}", data={"secret": "guess", "csrfmiddlewaretoken": token})
            )
        token = _csrf(http, limited.url, path)
        right = http.post(f"{limited.url}{path}", data={"secret": PASSWORD, "csrfmiddlewaretoken": token})
    assert [r.status_code for r in answers] == [200] * (limit - 1) + [429]
    assert "That is not right" in answers[0].text
    assert "Too many attempts. Try again in 2 minutes." in answers[-1].text
    # The right password is not even checked while locked: the approval is still pending.
    assert right.status_code == 429 and int(right.headers["Retry-After"]) >= 60
    assert "Too many attempts" in right.text
    fresh_auth_approval.refresh_from_db()
    assert fresh_auth_approval.status == ApprovalRequest.Status.PENDING
    assert AuditEvent.objects.filter(event="approval.reauth_failed").count() == limit
    locked = AuditEvent.objects.get(event="attempts.locked")
    assert locked.detail["kind"] == "fresh_auth" and locked.user_id == scenario.user.pk
    assert refusals()["locked:fresh_auth"] >= 1


def test_totp_codes_at_sign_in_are_attempt_limited(limited: LiveStack, scenario: Scenario) -> None:
    device = TOTPDevice.objects.create(user=scenario.user, name="phone", confirmed=True)
    limit = ATTEMPT_LIMITS["totp"]["account"]
    with from_source("127.0.1.3") as http:
        token = _csrf(http, limited.url, "/accounts/login/")
        first = http.post(
            f"{limited.url}/accounts/login/",
            data={"username": "officer", "password": PASSWORD, "csrfmiddlewaretoken": token},
        )
        assert first.status_code == 302 and "/accounts/login/otp/" in first.headers["Location"]
        answers = []
        for _ in range(limit):
            token = _csrf(http, limited.url, "/accounts/login/otp/")
            answers.append(
                http.post(
                    f"{limited.url}/accounts/login/otp/",
                    data={"token": "000000", "csrfmiddlewaretoken": token},
                )
            )
        token = _csrf(http, limited.url, "/accounts/login/otp/")
        code = f"{totp(device.bin_key, step=device.step, digits=device.digits):0{device.digits}d}"
        right = http.post(
            f"{limited.url}/accounts/login/otp/", data={"token": code, "csrfmiddlewaretoken": token}
        )
    assert [r.status_code for r in answers] == [200] * (limit - 1) + [429]
    assert right.status_code == 429 and "Too many attempts" in right.text and "sessionid" not in right.cookies
    assert AuditEvent.objects.filter(event="attempts.locked", user_id=scenario.user.pk).count() == 1


def test_lockouts_back_off_and_a_success_forgets_failures(db: None, settings: Settings) -> None:
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "LOCKOUT_SECONDS": 1,
        "LOCKOUT_MAX_SECONDS": 3,
        "ATTEMPT_LIMITS": {"totp": {"account": 2, "source": 50, "seconds": 60}},
    }
    keys = attempts.keys_for(account="u1", source="10.9.9.9")
    assert attempts.failed("totp", keys) == 0
    assert attempts.failed("totp", keys) == 1  # tripped: 1 s
    assert 0 < attempts.locked("totp", keys) <= 1
    time.sleep(1.1)
    assert attempts.locked("totp", keys) == 0
    attempts.failed("totp", keys)
    assert attempts.failed("totp", keys) == 2  # the second lockout of the day: doubled
    time.sleep(2.1)
    attempts.failed("totp", keys)
    assert attempts.failed("totp", keys) == 3  # capped at LOCKOUT_MAX_SECONDS
    assert AuditEvent.objects.filter(event="attempts.locked").count() == 3
    store.reset()
    attempts.failed("totp", keys)
    attempts.succeeded("totp", keys)
    assert attempts.failed("totp", keys) == 0  # counting started again after the success


def test_limits_fail_open_when_redis_is_unreachable(
    db: None, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    monkeypatch.setattr(store, "_client", unreachable)
    monkeypatch.setattr(
        store, "_scripts", {n: unreachable.register_script("return 0") for n in ("hit", "fail", "first")}
    )
    monkeypatch.setattr(store, "_down_until", 0.0)
    assert store.hit([("l:x", "f")], [("r:x", 1, 60, "f")]) == (0, 0, 0, False)
    assert store._down_until > 0  # and for a few seconds nothing tries again
    assert attempts.locked("totp", {"account": "u"}) == 0
    monkeypatch.setattr(store, "_down_until", 0.0)
    assert attempts.locked("totp", {"account": "u"}) == 0

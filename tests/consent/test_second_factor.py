"""TOTP enrolment, two-step login, and consent that requires a second factor."""

import jwt
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from audit.models import AuditEvent
from consent.models import SessionGrant
from tests.conftest import PASSWORD, REDIRECT_URI, OAuthFlow, Scenario, pkce_pair

pytestmark = pytest.mark.django_db


def _code(device: TOTPDevice, offset: int = 0) -> str:
    return f"{totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits, drift=offset):06d}"


def _enrol(client: Client, user: User) -> TOTPDevice:
    client.login(username=user.username, password=PASSWORD)
    page = client.get("/accounts/totp/")
    assert page.status_code == 200 and b"<svg" in page.content
    device = TOTPDevice.objects.get(user=user, confirmed=False)
    response = client.post("/accounts/totp/", {"token": _code(device)})
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.confirmed
    client.logout()
    return device


def test_enrolment_rejects_a_wrong_code(client: Client, scenario: Scenario) -> None:
    client.login(username="officer", password=PASSWORD)
    client.get("/accounts/totp/")
    response = client.post("/accounts/totp/", {"token": "000000"})
    assert response.status_code == 200 and b"not valid" in response.content
    assert not TOTPDevice.objects.filter(user=scenario.user, confirmed=True).exists()


def test_login_with_totp_gives_pwd_otp_amr_in_the_token(
    client: Client, flow: OAuthFlow, scenario: Scenario
) -> None:
    device = _enrol(client, scenario.user)
    response = client.post(
        "/accounts/login/", {"username": "officer", "password": PASSWORD, "next": "/grants/"}
    )
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/otp/")
    assert client.get("/grants/").status_code == 302  # not signed in until the code is given
    device.refresh_from_db()
    bad = client.post("/accounts/login/otp/", {"token": "123456" if _code(device) != "123456" else "654321"})
    assert bad.status_code == 200
    assert AuditEvent.objects.filter(event="login.otp_failed", outcome="refused").count() == 1
    device.refresh_from_db()
    assert device.throttling_failure_count == 1  # a wrong code slows the next try down
    device.throttle_reset()
    # The enrolment code's time step is spent (replay protection): the next step's code is accepted.
    ok = client.post("/accounts/login/otp/", {"token": _code(device, offset=1), "next": "/grants/"})
    assert ok.status_code == 302 and ok["Location"] == "/grants/"

    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=challenge)))
    token = flow.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        }
    ).json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["amr"] == ["pwd", "otp"]


def test_agent_requiring_second_factor_sends_password_only_user_to_the_otp_step(
    client: Client, flow: OAuthFlow, scenario: Scenario
) -> None:
    scenario.agent.require_second_factor = True
    scenario.agent.save()
    device = _enrol(client, scenario.user)
    # Sign in with the password only (a session from before the agent required 2FA).
    client.force_login(scenario.user)
    _, challenge = pkce_pair()
    query = flow.authorize_query(challenge=challenge)
    assert b"needs two-factor sign-in" in client.get("/o/authorize/?" + query).content
    response = flow.consent(query)
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/otp/")
    assert SessionGrant.objects.count() == 0
    stepped_up = client.post("/accounts/login/otp/", {"token": _code(device, offset=1)})
    assert stepped_up.status_code == 302
    code = flow.code_from(flow.consent(query))
    assert SessionGrant.objects.get().amr == ["pwd", "otp"]
    assert code


def test_failed_password_login_is_audited(client: Client, scenario: Scenario) -> None:
    response = client.post("/accounts/login/", {"username": "officer", "password": "wrong"})
    assert response.status_code == 200 and b"not right" in response.content
    assert AuditEvent.objects.filter(event="login.failed", outcome="refused").count() == 1

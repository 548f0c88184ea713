"""Signing in (password, then TOTP where enrolled), TOTP enrolment, connected agents."""

import time
from base64 import b32encode
from collections.abc import Iterable
from datetime import UTC, datetime
from io import BytesIO
from typing import Any
from uuid import UUID

import qrcode
import qrcode.image.svg
from django import forms
from django.contrib import messages
from django.contrib.auth import get_user_model, login, logout
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import User
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from audit.decorators import post_only
from audit.services import audit_record, audit_refusal, client_ip
from consent.http import AuthenticatedHttpRequest
from consent.limits import attempts
from consent.models import Agent, ScopePolicy

from ..instances import InstanceNotActive, agent_instance_cut_off
from ..services import AuthContext, grant_revoke

SESSION_AUTH_TIME = "cs_auth_time"
SESSION_AMR = "cs_amr"
SESSION_PENDING_USER = "cs_pending_user"
PENDING_LOGIN_SECONDS = 300


def auth_context(request: HttpRequest) -> AuthContext:
    """How this browser session authenticated: ``auth_time`` and ``amr`` (RFC 8176 values)."""
    ts = request.session.get(SESSION_AUTH_TIME) or time.time()
    return AuthContext(
        auth_time=datetime.fromtimestamp(ts, tz=UTC), amr=list(request.session.get(SESSION_AMR) or ["pwd"])
    )


def _confirmed_totp(user: User) -> TOTPDevice | None:
    return TOTPDevice.objects.devices_for_user(user, confirmed=True).first()


def second_factor_missing(request: HttpRequest, agent: Agent, policies: Iterable[ScopePolicy]) -> bool:
    required = agent.require_second_factor or any(p.require_second_factor for p in policies)
    return required and "otp" not in (request.session.get(SESSION_AMR) or [])


def _safe_next(request: HttpRequest, default: str = "/grants/") -> str:
    target = request.POST.get("next") or request.GET.get("next") or default
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default


def _too_many(request: HttpRequest, template: str, context: dict[str, Any], seconds: int) -> HttpResponse:
    """The page again, saying when to try next; nothing was checked (consent.limits.attempts)."""
    response = render(request, template, {**context, "locked_message": attempts.message(seconds)}, status=429)
    response["Retry-After"] = str(seconds)
    return response


def _complete_login(
    request: HttpRequest, user: User, amr: list[str], device: TOTPDevice | None = None
) -> None:
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    if device is not None:
        otp_login(request, device)
    request.session[SESSION_AUTH_TIME] = time.time()
    request.session[SESSION_AMR] = amr
    audit_record(
        event="login", actor=f"user:{user.pk}", user_id=user.pk, request=request, detail={"amr": amr}
    )


def login_view(request: HttpRequest) -> HttpResponse:
    form = AuthenticationForm(request, data=request.POST or None)
    if request.method == "POST":
        if form.is_valid():
            user = form.get_user()
            if _confirmed_totp(user) is not None:
                request.session[SESSION_PENDING_USER] = {"id": user.pk, "at": time.time()}
                return redirect(f"/accounts/login/otp/?next={_safe_next(request)}")
            _complete_login(request, user, ["pwd"])
            return redirect(_safe_next(request))
        if not getattr(
            request, "axes_locked_out", False
        ):  # a lockout is audited once (consent.limits.logins)
            audit_refusal(
                event="login.failed",
                error="invalid_credentials",
                actor="",
                request=request,
                detail={"username": request.POST.get("username", "")[:150]},
            )
    return render(request, "accounts/login.html", {"form": form, "next": _safe_next(request)})


class OTPForm(forms.Form):
    token = forms.CharField(
        label="6-digit code from your authenticator app",
        max_length=8,
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}),
    )


def login_otp_view(request: HttpRequest) -> HttpResponse:
    """Second step: a TOTP code, after the password or to step up an existing session."""
    pending = request.session.get(SESSION_PENDING_USER)
    if pending and time.time() - pending["at"] < PENDING_LOGIN_SECONDS:
        user = get_user_model().objects.filter(pk=pending["id"]).first()
        amr_before = ["pwd"]
    elif request.user.is_authenticated:
        user = request.user
        amr_before = list(request.session.get(SESSION_AMR) or ["pwd"])
    else:
        return redirect("/accounts/login/")
    device = _confirmed_totp(user) if user else None
    if user is None or device is None:
        return render(request, "accounts/otp_missing.html", {"next": _safe_next(request)})
    form = OTPForm(request.POST or None)
    keys = attempts.keys_for(account=user.pk, source=client_ip(request))
    if request.method == "POST" and (wait := attempts.locked("totp", keys)):
        attempts.refused_while_locked("totp", keys)
        return _too_many(
            request, "accounts/login_otp.html", {"form": form, "next": _safe_next(request)}, wait
        )
    if request.method == "POST" and form.is_valid():
        if device.verify_token(form.cleaned_data["token"].strip()):
            attempts.succeeded("totp", keys)
            request.session.pop(SESSION_PENDING_USER, None)
            amr = [m for m in amr_before if m != "otp"] + ["otp"]
            _complete_login(request, user, amr, device)
            return redirect(_safe_next(request))
        audit_refusal(
            event="login.otp_failed",
            error="invalid_otp",
            actor=f"user:{user.pk}",
            user_id=user.pk,
            request=request,
        )
        if wait := attempts.failed("totp", keys, request=request, actor=f"user:{user.pk}", user_id=user.pk):
            return _too_many(
                request, "accounts/login_otp.html", {"form": form, "next": _safe_next(request)}, wait
            )
        form.add_error("token", "That code is not valid. Codes change every 30 seconds.")
    return render(request, "accounts/login_otp.html", {"form": form, "next": _safe_next(request)})


@post_only
def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    return redirect("/accounts/login/")


@login_required
def totp_setup_view(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Enrol a TOTP authenticator: show the secret as a QR code, confirm with one code."""
    confirmed = _confirmed_totp(request.user)
    if confirmed is not None:
        return render(request, "accounts/totp_setup.html", {"enrolled": True})
    device, _ = TOTPDevice.objects.get_or_create(
        user=request.user, confirmed=False, defaults={"name": "Authenticator app"}
    )
    form = OTPForm(request.POST or None)
    keys = attempts.keys_for(account=request.user.pk, source=client_ip(request))
    wait = attempts.locked("totp", keys) if request.method == "POST" else 0
    if wait:  # nothing is checked while locked
        attempts.refused_while_locked("totp", keys)
        form.add_error("token", attempts.message(wait))
    elif request.method == "POST" and form.is_valid():
        if device.verify_token(form.cleaned_data["token"].strip()):
            TOTPDevice.objects.filter(pk=device.pk).update(confirmed=True)
            device.refresh_from_db()
            otp_login(request, device)
            request.session[SESSION_AMR] = ["pwd", "otp"]
            request.session[SESSION_AUTH_TIME] = time.time()
            audit_record(
                event="totp.enrolled",
                actor=f"user:{request.user.pk}",
                user_id=request.user.pk,
                request=request,
            )
            messages.success(request, "Two-factor sign-in is on.")
            return redirect("/grants/")
        wait = attempts.failed(
            "totp", keys, request=request, actor=f"user:{request.user.pk}", user_id=request.user.pk
        )
        form.add_error(
            "token",
            attempts.message(wait)
            if wait
            else "That code is not valid. Check your device's clock and try again.",
        )
    svg = BytesIO()
    qrcode.make(device.config_url, image_factory=qrcode.image.svg.SvgPathImage).save(svg)
    response = render(
        request,
        "accounts/totp_setup.html",
        {
            "form": form,
            "qr_svg": svg.getvalue().decode(),
            "secret": b32encode(device.bin_key).decode().rstrip("="),
        },
        status=429 if wait else 200,
    )
    if wait:
        response["Retry-After"] = str(wait)
    return response


@login_required
@post_only
def grant_revoke_view(request: AuthenticatedHttpRequest, grant_id: UUID) -> HttpResponse:
    if not grant_revoke(
        grant_id=grant_id,
        reason="revoked_by_user",
        actor=f"user:{request.user.pk}",
        user=request.user,
        request=request,
    ):
        raise Http404("No active grant with that id.")
    messages.success(request, "Access revoked. The agent's tokens stopped working.")
    back = f"/grants/{grant_id}/"
    return redirect(back if request.POST.get("next") == back else "/grants/")


@login_required
@post_only
def instance_cut_off_view(request: HttpRequest, grant_id: UUID, instance_pk: int) -> HttpResponse:
    """Cut off one instance of the agent from this person's grant; the grant and other instances stay."""
    try:
        instance = agent_instance_cut_off(
            instance_pk=instance_pk,
            by=f"user:{request.user.pk}",
            user_id=request.user.pk,
            grant_id=grant_id,
            request=request,
        )
    except InstanceNotActive:
        raise Http404("No active instance with that id on your connection.") from None
    messages.success(
        request, f"Instance {instance.short_id} was cut off. The agent's other instances keep working."
    )
    return redirect(f"/grants/{grant_id}/")

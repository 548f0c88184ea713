"""The sign-in password limit: django-axes, counting in Redis (the ``limits`` cache), with our
backoff and our answer.

Axes counts failed ``authenticate()`` calls per username and, separately, per source address
(``AXES_LOCKOUT_PARAMETERS``), and refuses further attempts past ``ATTEMPT_LIMITS["login"]``.
Here:

- ``LoginAttemptsBackend``: axes' backend for calls that come with a request. Scripts, the
  admin's shell and test clients call ``authenticate()`` without one; nothing is counted per
  source for them, so they go on to the model backend instead of failing.
- ``cool_off``: the lockout lasts ``LOCKOUT_SECONDS``, doubled for each further full round of
  failures (a failure during a lockout starts it again), up to ``LOCKOUT_MAX_SECONDS``.
- ``lockout_response``: "too many attempts, try again in N minutes", 429 with ``Retry-After``;
  the first refusal of a lockout is audited, the rest counted.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from axes.backends import AxesStandaloneBackend
from django.contrib.auth.base_user import AbstractBaseUser
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from consent.conf import countersign_settings

from . import attempts, store


class LoginAttemptsBackend(AxesStandaloneBackend):  # type: ignore[misc]  # django-axes ships no types
    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> AbstractBaseUser | None:
        if request is None:
            return None
        user: AbstractBaseUser | None = super().authenticate(
            request, username=username, password=password, **kwargs
        )
        return user


def failure_limit(request: HttpRequest | None = None, credentials: dict[str, Any] | None = None) -> int:
    return int(attempts.policy("login")["account"])


def _failures(request: HttpRequest) -> int:
    from axes.handlers.proxy import AxesProxyHandler

    username = request.POST.get("username", "") if request is not None and request.method == "POST" else ""
    try:
        failures: int = AxesProxyHandler.get_failures(request, {"username": username} if username else None)
        return failures
    except Exception:  # no counts to read (Redis down): the base cool-off
        return 0


def cool_off(request: HttpRequest | None = None) -> timedelta:
    base, cap = countersign_settings.LOCKOUT_SECONDS, countersign_settings.LOCKOUT_MAX_SECONDS
    if request is None:
        return timedelta(seconds=base)
    rounds = max(0, _failures(request) // max(1, failure_limit()) - 1)
    return timedelta(seconds=min(cap, base * 2 ** min(rounds, 20)))


def lockout_response(
    request: HttpRequest,
    original_response: HttpResponse | None = None,
    credentials: dict[str, Any] | None = None,
) -> HttpResponse:
    seconds = int(cool_off(request).total_seconds())
    username = ((credentials or {}).get("username") or request.POST.get("username", ""))[:150]
    source = str(request.META.get("REMOTE_ADDR", ""))[:64]
    if store.first_refusal(f"login:{username}:{source}", field="locked:login", window=seconds):
        from audit.services import audit_refusal

        audit_refusal(
            event="login.locked",
            error="too_many_attempts",
            actor="",
            request=request,
            detail={"username": username, "seconds": seconds},
        )
    response = render(request, "accounts/locked.html", {"message": attempts.message(seconds)}, status=429)
    response["Retry-After"] = str(seconds)
    return response

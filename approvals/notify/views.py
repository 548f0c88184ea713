"""The person's side of the delivery channels: their devices and email preference
(``/approvals/devices/``), subscribing a browser (JSON POST from static/countersign/push.js),
opening a prompt from a notification or mail link, and the installable inbox (service worker,
web app manifest)."""

from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.templatetags.static import static

from audit.decorators import post_only
from audit.services import audit_refusal
from consent.conf import countersign_settings
from consent.errors import OAuthError
from consent.http import NO_STORE, error_response

from ..models import ApprovalRequest
from .models import NotificationPreference, PromptDelivery, PushSubscription
from .services import (
    email_preference,
    email_preference_set,
    prompt_opened,
    push_subscription_register,
    push_subscription_remove,
)
from .webpush import vapid_key


def _me(request: HttpRequest) -> "User":
    """The signed-in user (every view here is behind ``login_required``)."""
    user = request.user
    if isinstance(user, AnonymousUser):
        raise PermissionDenied
    return user


SERVICE_WORKER = Path(settings.BASE_DIR) / "static" / "countersign" / "sw.js"


@login_required
def devices_view(request: HttpRequest) -> HttpResponse:
    """The user's devices (each with Remove) and when to email them."""
    me = _me(request)
    return render(
        request,
        "approvals/devices.html",
        {
            "devices": PushSubscription.objects.filter(user=me),
            "email_choices": NotificationPreference.Email.choices,
            "email_preference": email_preference(user_id=me.pk),
            "email_address": me.email,
            "push_enabled": countersign_settings.PUSH_ENABLED,
            "vapid_public_key": vapid_key().public_key if countersign_settings.PUSH_ENABLED else "",
        },
    )


@login_required
@post_only
def subscribe_view(request: HttpRequest) -> JsonResponse:
    """Keep this browser's push subscription (JSON ``PushSubscription.toJSON()``; CSRF header)."""
    if not countersign_settings.PUSH_ENABLED:
        raise Http404("Notifications to devices are off here.")
    try:
        device, created = push_subscription_register(
            user=request.user,
            body=request.body,
            label=request.headers.get("X-Device-Label", ""),
            request=request,
        )
    except OAuthError as exc:
        return error_response(exc)
    return JsonResponse(
        {"id": str(device.pk), "created": created}, status=201 if created else 200, headers=NO_STORE
    )


@login_required
@post_only
def remove_view(request: HttpRequest, device_id: Any) -> HttpResponse:
    """Remove one of the user's own devices; another user's device id is a 404 (audited)."""
    try:
        push_subscription_remove(user=request.user, device_id=device_id, request=request)
    except OAuthError as exc:
        if request.headers.get("Accept", "").startswith("application/json"):
            return error_response(exc)
        raise Http404("No such device.") from exc
    messages.success(request, "Device removed: it gets no more notifications.")
    return redirect("/approvals/devices/")


@login_required
@post_only
def email_preference_view(request: HttpRequest) -> HttpResponse:
    try:
        email_preference_set(user=request.user, email=request.POST.get("email", "")[:20], request=request)
    except OAuthError as exc:
        messages.error(request, exc.description)
        return redirect("/approvals/devices/")
    messages.success(request, "Email preference saved.")
    return redirect("/approvals/devices/")


@login_required
def open_view(request: HttpRequest, approval_id: Any) -> HttpResponse:
    """A prompt opened from a notification or a mail link (``?via=push|email|webhook``): the click is
    recorded once, and the inbox opens at the prompt. A GET decides nothing."""
    me = _me(request)
    approval = ApprovalRequest.objects.select_related("agent").filter(pk=approval_id, user=me).first()
    if approval is None:
        audit_refusal(
            event="approval.open_refused",
            error="approval_not_found",
            actor=f"user:{me.pk}",
            user_id=me.pk,
            request=request,
            detail={"approval_id": str(approval_id)},
        )
        raise Http404("No such approval request.")
    prompt_opened(approval=approval, via=request.GET.get("via", "")[:16])
    return redirect(f"/approvals/#prompt-{approval.pk}")


def service_worker_view(request: HttpRequest) -> HttpResponse:
    """The service worker, served from /approvals/ so that its scope is the inbox (a script's
    default scope is its own directory)."""
    response = HttpResponse(SERVICE_WORKER.read_bytes(), content_type="text/javascript; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    return response


def manifest_view(request: HttpRequest) -> JsonResponse:
    """The web app manifest: the inbox installs as an app (icons from our own static files)."""
    icons = [
        {
            "src": static(f"countersign/icons/icon-{size}.png"),
            "sizes": f"{size}x{size}",
            "type": "image/png",
            "purpose": "any",
        }
        for size in (192, 512)
    ]
    icons.append({"src": static("countersign/icons/icon.svg"), "sizes": "any", "type": "image/svg+xml"})
    manifest = {
        "name": "Countersign approvals",
        "short_name": "Countersign",
        "start_url": "/approvals/",
        "scope": "/approvals/",
        "display": "standalone",
        "background_color": "#ffffff",
        "theme_color": "#1f4e79",
        "icons": icons,
    }
    return JsonResponse(manifest, content_type="application/manifest+json")


def deliveries_by_approval(approval_ids: list[Any]) -> dict[str, list[PromptDelivery]]:
    """What each channel did for these prompts, for the inbox's history."""
    found: dict[str, list[PromptDelivery]] = {}
    for d in PromptDelivery.objects.filter(approval_id__in=approval_ids).order_by("at", "id"):
        found.setdefault(str(d.approval_id), []).append(d)
    return found

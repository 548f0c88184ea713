"""System checks on the delivery channels' settings (consent.conf has their kinds)."""

from typing import Any

from django.core.checks import CheckMessage, Error, register

from consent.conf import countersign_settings

from .models import NotificationPreference


@register()
def notify_config(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    problems: list[CheckMessage] = []
    if countersign_settings.EMAIL_DEFAULT_PREFERENCE not in NotificationPreference.Email.values:
        problems.append(
            Error(
                "COUNTERSIGN EMAIL_DEFAULT_PREFERENCE must be unreachable, always or never",
                id="countersign.E101",
            )
        )
    contact = countersign_settings.PUSH_CONTACT
    if contact and not contact.startswith(("mailto:", "https://")):
        problems.append(
            Error(
                "COUNTERSIGN PUSH_CONTACT must be a mailto: or https: URI (RFC 8292 §2.1)",
                id="countersign.E102",
            )
        )
    for name in (
        "PUSH_TIMEOUT_SECONDS",
        "WEBHOOK_TIMEOUT_SECONDS",
        "PUSH_SUBSCRIPTION_MAX_BYTES",
        "PUSH_MAX_DEVICES_PER_USER",
    ):
        if getattr(countersign_settings, name) <= 0:
            problems.append(Error(f"COUNTERSIGN {name} must be positive", id="countersign.E103"))
    if countersign_settings.EMAIL_FALLBACK_DELAY_SECONDS < 0:
        problems.append(
            Error("COUNTERSIGN EMAIL_FALLBACK_DELAY_SECONDS must not be negative", id="countersign.E104")
        )
    return problems

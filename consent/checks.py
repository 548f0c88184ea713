"""System checks: a bad configuration fails at start-up, not at the first request."""

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from .conf import countersign_settings
from .keys import SUPPORTED_ALGS


@register()
def countersign_config(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    # Unknown keys and values of the wrong kind never get this far: ConsentConfig.ready refuses
    # them in every process (consent.conf.validate).
    problems: list[CheckMessage] = []
    issuer = countersign_settings.ISSUER
    parsed = urlparse(issuer)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.fragment:
        problems.append(
            Error(
                f"COUNTERSIGN_ISSUER {issuer!r} must be an http(s) URL without query or fragment",
                id="countersign.E001",
            )
        )
    elif parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        problems.append(
            Warning(
                "COUNTERSIGN_ISSUER uses http on a non-loopback host; use https (RFC 8414 §2)",
                id="countersign.W001",
            )
        )
    if countersign_settings.SIGNING_ALG not in SUPPORTED_ALGS:
        problems.append(
            Error(f"COUNTERSIGN signing algorithm must be one of {SUPPORTED_ALGS}", id="countersign.E002")
        )
    if countersign_settings.LEEWAY_SECONDS > 30:
        problems.append(
            Error("COUNTERSIGN LEEWAY_SECONDS must be at most 30 (RFC 8725 §3.10)", id="countersign.E003")
        )
    registration = countersign_settings.CLIENT_REGISTRATION
    if registration not in ("open", "off", "initial_access_token"):
        problems.append(
            Error(
                "COUNTERSIGN CLIENT_REGISTRATION must be open, off or initial_access_token",
                id="countersign.E005",
            )
        )
    elif registration == "initial_access_token" and not countersign_settings.REGISTRATION_ACCESS_TOKENS:
        problems.append(
            Error(
                "COUNTERSIGN CLIENT_REGISTRATION initial_access_token needs REGISTRATION_ACCESS_TOKENS",
                id="countersign.E006",
            )
        )
    if settings.OAUTH2_PROVIDER_APPLICATION_MODEL != "consent.Agent":
        problems.append(
            Error("OAUTH2_PROVIDER_APPLICATION_MODEL must be consent.Agent", id="countersign.E004")
        )
    return problems

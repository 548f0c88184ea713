import json
from collections.abc import Callable
from typing import Any, TypeVar

from django.core.management.base import CommandError

from consent.errors import OAuthError

T = TypeVar("T")


def load_jwks(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read JWKS from {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise CommandError(f"{path} is not a JWK Set (an object with a 'keys' list)")
    return data


def run_service(fn: Callable[..., T], **kwargs: Any) -> T:
    """Call a service and turn domain and validation errors into a clean CommandError."""
    from django.core.exceptions import ValidationError

    try:
        return fn(**kwargs)
    except OAuthError as exc:
        raise CommandError(exc.description) from exc
    except ValidationError as exc:
        raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from exc

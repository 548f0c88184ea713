"""Why the current request was refused, for the audit row the view writes.

oauthlib answers a refused token request with an error body only; the validator
knows the reason (unknown code, reused refresh token, ...). It records it here,
and the endpoint view reads it when it audits the refusal.
"""

from contextvars import ContextVar

_refusal: ContextVar[str] = ContextVar("countersign_refusal", default="")


def note_refusal(reason: str) -> None:
    _refusal.set(reason)


def take_refusal() -> str:
    reason = _refusal.get()
    _refusal.set("")
    return reason

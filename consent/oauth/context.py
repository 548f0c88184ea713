"""Why the current request was refused, for the audit row the view writes.

oauthlib answers a refused token request with an error body only; the validator
knows the reason (unknown code, reused refresh token, ...). It records it here,
and the endpoint view reads it when it audits the refusal.
"""

from contextvars import ContextVar

_refusal: ContextVar[tuple[str, bool]] = ContextVar("countersign_refusal", default=("", False))


def note_refusal(reason: str, *, audited: bool = False) -> None:
    """Record why; ``audited`` when the refusal already has its own, more specific audit row."""
    _refusal.set((reason, audited))


def take_refusal() -> tuple[str, bool]:
    refusal = _refusal.get()
    _refusal.set(("", False))
    return refusal

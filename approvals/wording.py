"""What the person reads: protocol values turned into words.

RFC 8176 ``amr`` values, and what approving one step-up request gives the agent (the scope
policy's action-token lifetime and the system its audience names).
"""

import time
from typing import Any

from consent.models import ResourceServer, ScopePolicy

from .ciba import EXTEND_SCOPE

# RFC 8176 §2 authentication method reference values, as a person would say them.
AMR_WORDS = {
    "pwd": "password",
    "otp": "code from an authenticator app",
    "totp": "code from an authenticator app",
    "mfa": "two factors",
    "hwk": "security key",
    "swk": "software key",
    "sms": "code by text message",
    "face": "face recognition",
    "fpt": "fingerprint",
    "pin": "PIN",
}


def auth_words(amr: Any) -> str:
    """["pwd", "otp"] -> "password and code from an authenticator app"."""
    if not isinstance(amr, (list, tuple)):
        return ""
    words = [AMR_WORDS.get(str(m), str(m)) for m in amr if m != "mfa" or len(amr) == 1]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


# What a request's state means to the person who decided it (the model's labels are the admin's).
STATUS_WORDS = {
    "pending": "Waiting for you",
    "approved": "Approved",
    "issued": "Approved, token collected",
    "redeemed": "Redeemed",
    "denied": "Denied",
    "expired": "Expired",
    "cancelled": "Cancelled",
}


def status_words(status: str) -> str:
    return STATUS_WORDS.get(status, status.capitalize())


# scope -> (until (monotonic), sentence). Policies change rarely; a prompt pushed within a minute
# of a change may still say the old lifetime, the token itself always carries the new one.
_GIVES: dict[str, tuple[float, str]] = {}
_GIVES_SECONDS = 60.0


def approve_gives(scope: str) -> str:
    """One sentence: what pressing Approve on a request for ``scope`` hands the agent."""
    if scope == EXTEND_SCOPE:
        return "Approving extends how long this connection lasts. No token for any system is issued."
    hit = _GIVES.get(scope)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    policy = ScopePolicy.objects.filter(name=scope).values_list("audience", "action_token_ttl").first()
    if policy is None:
        sentence = "Approving gives the agent one single-use token for exactly this action."
    else:
        audience, ttl = policy
        system = ResourceServer.objects.filter(audience=audience).values_list("name", flat=True).first()
        sentence = (
            f"Approving gives the agent one single-use token for {system or audience}, valid for "
            f"{ttl} seconds, for exactly this action and nothing else."
        )
    _GIVES[scope] = (time.monotonic() + _GIVES_SECONDS, sentence)
    return sentence


def forget_wording() -> None:
    _GIVES.clear()

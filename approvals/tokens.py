"""Action tokens: one-shot JWTs bound to exactly one approved action.

Header ``typ: action+jwt`` (RFC 8725 §3.11: explicit typing keeps them from
being accepted where a session token ``at+jwt`` is expected, and vice versa).
"""

import secrets
import time
from typing import Any

from consent.conf import countersign_settings
from consent.instances import act_claim
from consent.tokens import ACTION_TOKEN_TYP, sign, subject_id

from .models import ApprovalRequest


def action_claims(*, approval: ApprovalRequest, audience: str, ttl: int) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": countersign_settings.ISSUER,
        "sub": subject_id(approval.user_id),
        "aud": audience,
        "client_id": approval.agent.client_id,
        "scope": approval.scope,
        "act": act_claim(approval.agent.client_id, approval.instance),
        "grant_id": str(approval.grant_id),
        "approval_id": str(approval.pk),
        "authorization_details": approval.authorization_details,
        "action_hash": approval.action_hash,
        "jti": secrets.token_urlsafe(16),
        "iat": now,
        "exp": now + ttl,
    }
    if approval.decided_at is not None:  # when the person approved it (receipts name it)
        claims["approved_at"] = int(approval.decided_at.timestamp())
    auth = approval.decision_auth or {}
    if auth.get("auth_time"):
        claims["auth_time"] = int(auth["auth_time"])
    if auth.get("amr"):
        claims["amr"] = list(auth["amr"])
    if auth.get("acr"):
        claims["acr"] = auth["acr"]
    if auth.get("approvers"):  # two-person approval: everyone whose approval met the quorum, each signed in
        claims["approvers"] = [dict(a) for a in auth["approvers"]]
    return claims


def mint(claims: dict[str, Any]) -> str:
    return sign(claims, typ=ACTION_TOKEN_TYP)

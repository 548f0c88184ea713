"""Signed receipts: after an action token is redeemed, a JWS (RFC 7515) by the server's key
that says who asked, who approved and how they authenticated, exactly what (RFC 9396
``authorization_details`` and its ``action_hash``), when it was approved and redeemed, and by
which resource server. Header ``typ: receipt+jwt`` (RFC 8725 §3.11: never mistaken for a token).

The redemption response carries one, signed from the verified action token's claims and the
resource server already in hand (no statement of its own); the inbox and the grant's timeline
rebuild the same claims from the database for download. ``countersign`` verifies it offline
against a JWKS.
"""

from datetime import datetime
from typing import Any

from consent.conf import countersign_settings
from consent.models import ResourceServer
from consent.tokens import actor_id, sign, subject_id

from .models import ApprovalRequest

RECEIPT_TYP = "receipt+jwt"


def receipt_claims(
    *,
    sub: str,
    act: dict[str, Any],
    client_id: str,
    approval_id: str,
    grant_id: str,
    scope: str,
    authorization_details: Any,
    action_hash: str,
    jti: str,
    approver_auth: dict[str, Any],
    approved_at: int | None,
    redeemed_at: datetime,
    resource_server: ResourceServer,
) -> dict[str, Any]:
    approver: dict[str, Any] = {"sub": sub, "amr": list(approver_auth.get("amr") or [])}
    if approver_auth.get("auth_time"):
        approver["auth_time"] = int(approver_auth["auth_time"])
    if approver_auth.get("acr"):
        approver["acr"] = approver_auth["acr"]
    redeemed = int(redeemed_at.timestamp())
    claims: dict[str, Any] = {
        "iss": countersign_settings.ISSUER,
        "iat": redeemed,
        "jti": jti,
        "sub": sub,
        "act": act,
        "client_id": client_id,
        "approver": approver,
        "approval_id": approval_id,
        "grant_id": grant_id,
        "scope": scope,
        "authorization_details": authorization_details,
        "action_hash": action_hash,
        "redeemed_at": redeemed,
        "resource_server": {
            "audience": resource_server.audience,
            "client_id": resource_server.client_id,
            "name": resource_server.name,
        },
    }
    if approved_at:
        claims["approved_at"] = int(approved_at)
    return claims


def receipt_from_redemption(
    *, claims: dict[str, Any], resource_server: ResourceServer, redeemed_at: datetime
) -> str:
    """The receipt for a redemption that just won, from the action token's own claims."""
    return sign(
        receipt_claims(
            sub=claims["sub"],
            act=claims["act"],
            client_id=claims["client_id"],
            approval_id=claims["approval_id"],
            grant_id=claims["grant_id"],
            scope=claims["scope"],
            authorization_details=claims["authorization_details"],
            action_hash=claims["action_hash"],
            jti=claims["jti"],
            approver_auth={k: claims[k] for k in ("amr", "auth_time", "acr") if k in claims},
            approved_at=claims.get("approved_at"),
            redeemed_at=redeemed_at,
            resource_server=resource_server,
        ),
        typ=RECEIPT_TYP,
    )


def receipt_for_download(*, approval_id: Any, user_id: int) -> tuple[ApprovalRequest, str] | None:
    """The same receipt, rebuilt from the database, for the owner of a redeemed request; else None."""
    approval = (
        ApprovalRequest.objects.select_related("agent", "action_token", "action_token__redeemed_by")
        .filter(pk=approval_id, user_id=user_id, status=ApprovalRequest.Status.REDEEMED)
        .first()
    )
    token = getattr(approval, "action_token", None) if approval is not None else None
    if approval is None or token is None or token.redeemed_at is None or token.redeemed_by is None:
        return None
    return approval, sign(
        receipt_claims(
            sub=subject_id(approval.user_id),
            act={"sub": actor_id(approval.agent.client_id)},
            client_id=approval.agent.client_id,
            approval_id=str(approval.pk),
            grant_id=str(approval.grant_id),
            scope=approval.scope,
            authorization_details=approval.authorization_details,
            action_hash=approval.action_hash,
            jti=token.jti,
            approver_auth=approval.decision_auth or {},
            approved_at=int(approval.decided_at.timestamp()) if approval.decided_at else None,
            redeemed_at=token.redeemed_at,
            resource_server=token.redeemed_by,
        ),
        typ=RECEIPT_TYP,
    )

"""Reads for the consent app."""

import hashlib
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.hashers import check_password
from django.db.models import QuerySet
from django.utils import timezone

from .models import AccessToken, Agent, ResourceServer, ScopePolicy, SessionGrant
from .tokens import SESSION_TOKEN_TYP, TokenInvalid, verify


def resource_server_authenticate(*, client_id: str, secret: str) -> ResourceServer | None:
    rs = ResourceServer.objects.filter(client_id=client_id, is_active=True).first()
    if rs is None or not check_password(secret, rs.client_secret):
        return None
    return rs


def scope_policies(names: list[str]) -> list[ScopePolicy]:
    by_name = {p.name: p for p in ScopePolicy.objects.filter(name__in=names)}
    return [by_name[n] for n in names if n in by_name]


def grants_for_user(*, user) -> QuerySet[SessionGrant]:
    return SessionGrant.objects.filter(user=user).select_related("agent").order_by("-created")


@dataclass(frozen=True)
class Introspection:
    active: bool
    claims: dict[str, Any]
    reason: str = ""

    def as_response(self) -> dict[str, Any]:
        """RFC 7662 §2.2 response members."""
        if not self.active:
            return {"active": False}
        c = self.claims
        return {
            "active": True,
            "token_type": "Bearer",
            **{k: c[k] for k in ("iss", "sub", "aud", "act", "scope", "client_id", "grant_id", "exp", "iat",
                                 "jti", "auth_time", "acr", "amr", "cnf") if k in c},
        }


def session_token_introspect(*, token: str, resource_server: ResourceServer) -> Introspection:
    """RFC 7662: is this session token active, for this resource server, right now?

    Inactive when it does not verify, is expired, was not issued to this resource
    server's audience, or its grant is revoked/expired or its agent suspended.
    """
    try:
        claims = verify(token, typ=SESSION_TOKEN_TYP)
    except TokenInvalid as exc:
        return Introspection(False, {}, str(exc))
    aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if resource_server.audience not in aud:
        return Introspection(False, {}, "token not issued for this resource server")
    checksum = hashlib.sha256(token.encode()).hexdigest()
    row = (
        AccessToken.objects.select_related("session_grant", "application")
        .filter(token_checksum=checksum)
        .first()
    )
    now = timezone.now()
    if row is None or row.expires <= now:
        return Introspection(False, {}, "token revoked")
    if not row.session_grant.is_live(now):
        return Introspection(False, {}, f"grant {row.session_grant.status}")
    if row.application.status != Agent.Status.ACTIVE:
        return Introspection(False, {}, "agent suspended")
    return Introspection(True, claims)

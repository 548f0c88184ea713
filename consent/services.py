"""Every write in the consent app: registry changes, grants, revocation.

Keyword-only arguments, ids or domain objects in, domain objects out; state
changes are conditional UPDATEs whose row count decides races.
"""

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from audit.services import audit_record

from .conf import countersign_settings
from .errors import ConfigurationError, InvalidScope
from .hashers import generate_secret
from .models import AccessToken, Agent, RefreshToken, ResourceServer, ScopePolicy, SessionGrant
from .signals import grant_ended
from .tokens import forget_audiences

SECRET_HASHER = "cs_sha256"


@dataclass(frozen=True)
class AuthContext:
    """How the user authenticated in this browser session (OIDC Core §2 auth_time/acr/amr)."""

    auth_time: Any
    amr: list[str]
    acr: str = ""


def hash_secret(secret: str) -> str:
    return make_password(secret, hasher=SECRET_HASHER)


def _check_scopes_exist(scopes: list[str]) -> None:
    known = set(ScopePolicy.objects.filter(name__in=scopes).values_list("name", flat=True))
    unknown = sorted(set(scopes) - known)
    if unknown:
        raise InvalidScope(f"unknown scope(s): {' '.join(unknown)} (create them with scope_set)")


# --- agent registry ---------------------------------------------------------------------------


def agent_create(
    *,
    name: str,
    publisher: str,
    scopes: list[str],
    redirect_uris: list[str],
    description: str = "",
    refresh_mode: str = Agent.RefreshMode.ROTATING,
    ttl: int | None = None,
    jwks: dict[str, Any] | None = None,
    actor: str = "system",
) -> tuple[Agent, str]:
    """Register an agent. Returns it with its client secret, which is shown this once."""
    _check_scopes_exist(scopes)
    if not redirect_uris:
        raise ConfigurationError("an agent needs at least one redirect URI")
    secret = generate_secret()
    agent = Agent(
        name=name,
        publisher=publisher,
        description=description,
        allowed_scopes=scopes,
        redirect_uris=" ".join(redirect_uris),
        client_type=Agent.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Agent.GRANT_AUTHORIZATION_CODE,
        client_secret=secret,
        hash_client_secret=True,
        refresh_mode=refresh_mode,
        jwks=jwks,
        access_token_ttl=ttl if ttl is not None else countersign_settings.DEFAULT_ACCESS_TOKEN_TTL,
    )
    agent.full_clean(exclude=["client_secret", "user"])
    agent.save()
    audit_record(
        event="agent.created",
        actor=actor,
        client_id=agent.client_id,
        detail={"name": name, "scopes": scopes, "refresh_mode": refresh_mode},
    )
    return agent, secret


def agent_reset_secret(*, agent: Agent, actor: str = "system") -> str:
    secret = generate_secret()
    Agent.objects.filter(pk=agent.pk).update(client_secret=hash_secret(secret))
    audit_record(event="agent.secret_reset", actor=actor, client_id=agent.client_id)
    return secret


def agent_update(*, agent: Agent, changes: dict[str, Any], actor: str = "system") -> Agent:
    if "allowed_scopes" in changes:
        _check_scopes_exist(changes["allowed_scopes"])
    if "delegates" in changes:
        delegates = list(changes["delegates"])
        known = set(Agent.objects.filter(client_id__in=delegates).values_list("client_id", flat=True))
        if set(delegates) - known or agent.client_id in delegates:
            raise ConfigurationError("delegates must be other registered agents' client ids")
    for field, value in changes.items():
        setattr(agent, field, value)
    agent.full_clean(exclude=["client_secret", "user"])
    agent.save(update_fields=[*changes, "updated"])
    audit_record(
        event="agent.changed",
        actor=actor,
        client_id=agent.client_id,
        detail={k: v for k, v in changes.items() if k != "jwks"}
        | ({"jwks": "changed"} if "jwks" in changes else {}),
    )
    if changes.get("status") == Agent.Status.SUSPENDED:
        for grant_id in SessionGrant.objects.filter(
            agent=agent, status=SessionGrant.Status.ACTIVE
        ).values_list("pk", flat=True):
            grant_revoke(grant_id=grant_id, reason="agent_suspended", actor=actor)
    return agent


# --- resource servers and scope policy --------------------------------------------------------


def resource_server_create(*, name: str, audience: str, actor: str = "system") -> tuple[ResourceServer, str]:
    secret = generate_secret()
    rs = ResourceServer(
        name=name,
        audience=audience,
        client_id=f"rs_{secrets.token_urlsafe(12)}",
        client_secret=hash_secret(secret),
    )
    rs.full_clean()
    rs.save()
    audit_record(
        event="resource_server.created",
        actor=actor,
        client_id=rs.client_id,
        detail={"name": name, "audience": audience},
    )
    return rs, secret


def resource_server_reset_secret(*, rs: ResourceServer, actor: str = "system") -> str:
    secret = generate_secret()
    ResourceServer.objects.filter(pk=rs.pk).update(client_secret=hash_secret(secret))
    audit_record(event="resource_server.secret_reset", actor=actor, client_id=rs.client_id)
    return secret


def scope_set(*, name: str, values: dict[str, Any], actor: str = "system") -> tuple[ScopePolicy, bool]:
    """Create or change a scope policy. Returns (policy, created)."""
    found = ScopePolicy.objects.filter(name=name).first()
    created = found is None
    policy = ScopePolicy(name=name) if found is None else found
    for field, value in values.items():
        setattr(policy, field, value)
    if created and not policy.description:
        policy.description = name
    policy.full_clean()
    policy.save()
    forget_audiences()
    audit_record(
        event="scope_policy.created" if created else "scope_policy.changed",
        actor=actor,
        detail={"name": name, **{k: str(v) if isinstance(v, Decimal) else v for k, v in values.items()}},
    )
    return policy, created


# --- session grants ---------------------------------------------------------------------------


def split_scopes(scopes: list[str]) -> tuple[list[str], list[str]]:
    """(standard, step_up), in request order."""
    step_up = set(
        ScopePolicy.objects.filter(name__in=scopes, sensitivity=ScopePolicy.Sensitivity.STEP_UP).values_list(
            "name", flat=True
        )
    )
    return [s for s in scopes if s not in step_up], [s for s in scopes if s in step_up]


def delegates_of(agent: Agent) -> list[Agent]:
    """The active registered sub-agents this agent may hand work to (shown at consent)."""
    return list(Agent.objects.filter(client_id__in=agent.delegates or [], status=Agent.Status.ACTIVE))


def grant_lifetime_choices(agent: Agent) -> list[int]:
    cap = min(agent.max_grant_lifetime, countersign_settings.MAX_GRANT_LIFETIME)
    choices = [c for c in countersign_settings.GRANT_LIFETIME_CHOICES if c <= cap]
    return choices or [cap]


def grant_create(
    *,
    user: User,
    agent: Agent,
    scopes: list[str],
    lifetime: int,
    auth: AuthContext,
    consent_shown: dict[str, Any],
    request: HttpRequest | None = None,
) -> SessionGrant:
    if lifetime not in grant_lifetime_choices(agent):
        raise ConfigurationError("grant lifetime outside what the agent may offer")
    standard, step_up = split_scopes(scopes)
    delegates = delegates_of(agent)
    now = timezone.now()
    with transaction.atomic():
        grant = SessionGrant.objects.create(
            user=user,
            agent=agent,
            standard_scopes=standard,
            step_up_scopes=step_up,
            permitted_delegates=[d.client_id for d in delegates],
            consent_shown=consent_shown,
            auth_time=auth.auth_time,
            amr=auth.amr,
            acr=auth.acr,
            created=now,
            expires_at=now + timedelta(seconds=lifetime),
        )
        audit_record(
            event="consent.given",
            actor=f"user:{user.pk}",
            user_id=user.pk,
            client_id=agent.client_id,
            grant_id=grant.pk,
            request=request,
            detail={
                "standard_scopes": standard,
                "step_up_scopes": step_up,
                "lifetime": lifetime,
                "amr": auth.amr,
            },
        )
    return grant


def grant_extend(*, grant_id: Any, seconds: int, actor: str, approval_id: Any = None) -> SessionGrant | None:
    """Keep a live grant going ``seconds`` from now, within the agent's maximum lifetime.

    Only called when the user approved an extension prompt. Never shortens a grant.
    """
    now = timezone.now()
    with transaction.atomic():
        grant = (
            SessionGrant.objects.select_for_update(of=("self",))
            .select_related("agent")
            .filter(pk=grant_id)
            .first()
        )
        if grant is None or not grant.is_live(now):
            return None
        seconds = min(seconds, grant.agent.max_grant_lifetime, countersign_settings.MAX_GRANT_LIFETIME)
        new_end = max(grant.expires_at, now + timedelta(seconds=seconds))
        SessionGrant.objects.filter(pk=grant.pk).update(expires_at=new_end)
        audit_record(
            event="grant.extended",
            actor=actor,
            user_id=grant.user_id,
            client_id=grant.agent.client_id,
            grant_id=grant.pk,
            detail={
                "from": grant.expires_at.isoformat(),
                "to": new_end.isoformat(),
                "approval_id": str(approval_id or ""),
            },
        )
        grant.expires_at = new_end
    return grant


def _end_grant_tokens(grant_id: Any, now: datetime) -> None:
    RefreshToken.objects.filter(session_grant_id=grant_id, revoked__isnull=True).update(revoked=now)
    AccessToken.objects.filter(session_grant_id=grant_id, expires__gt=now).update(expires=now)


def grant_revoke(
    *, grant_id: Any, reason: str, actor: str, user: User | None = None, request: HttpRequest | None = None
) -> bool:
    """Revoke a grant and every token from it. Returns False if it was not active.

    With ``user`` given, only that user's grant can be revoked.
    """
    now = timezone.now()
    filters: dict[str, Any] = {"pk": grant_id, "status": SessionGrant.Status.ACTIVE}
    if user is not None:
        filters["user"] = user
    with transaction.atomic():
        updated = SessionGrant.objects.filter(**filters).update(
            status=SessionGrant.Status.REVOKED, ended_at=now, end_reason=reason
        )
        if updated != 1:
            return False
        grant = SessionGrant.objects.select_related("agent").get(pk=grant_id)
        _end_grant_tokens(grant.pk, now)
        grant_ended.send(
            sender=SessionGrant, grant_id=grant.pk, reason=reason, actor=actor, user_id=grant.user_id
        )
        audit_record(
            event="grant.revoked",
            actor=actor,
            user_id=grant.user_id,
            client_id=grant.agent.client_id,
            grant_id=grant.pk,
            request=request,
            detail={"reason": reason},
        )
    return True


def grants_expire() -> int:
    """Mark grants past their lifetime as expired (run periodically by Celery beat)."""
    now = timezone.now()
    count = 0
    due = SessionGrant.objects.filter(status=SessionGrant.Status.ACTIVE, expires_at__lte=now)
    for grant in due.select_related("agent")[:1000]:
        with transaction.atomic():
            updated = SessionGrant.objects.filter(pk=grant.pk, status=SessionGrant.Status.ACTIVE).update(
                status=SessionGrant.Status.EXPIRED, ended_at=now, end_reason="lifetime_ended"
            )
            if updated == 1:
                _end_grant_tokens(grant.pk, now)
                grant_ended.send(
                    sender=SessionGrant,
                    grant_id=grant.pk,
                    reason="lifetime_ended",
                    actor="system",
                    user_id=grant.user_id,
                )
                audit_record(
                    event="grant.expired",
                    actor="system",
                    user_id=grant.user_id,
                    client_id=grant.agent.client_id,
                    grant_id=grant.pk,
                )
                count += 1
    return count

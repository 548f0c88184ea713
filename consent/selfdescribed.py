"""Agents that were never registered by an administrator: the policy they live under, and their rows.

Two ways in, both marked on the agent (``Agent.registration``) with the metadata as received
and where it came from:

- a Client ID Metadata Document (``consent.oauth.cimd``): the ``client_id`` is an https URL the
  agent's publisher controls, and the document there describes it;
- RFC 7591 dynamic registration (``consent.views.registration``).

Policy (``COUNTERSIGN`` settings):

- ``SELF_DESCRIBED_SCOPES``: the scopes such an agent may ever ask for ([] = every scope);
- status: in production a self-described agent starts ``pending_review``: it may hold session
  tokens for standard scopes, but no step-up scope is granted and no approval is opened for it
  until an admin activates it (``agent_update CLIENT_ID --status active``, or the admin's
  "Activate" action). In development (an http loopback issuer, as ``make run`` has) it starts
  ``active``, and documents and registrations on loopback are accepted with no extra setting.
"""

import secrets
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest

from audit.services import audit_record

from .conf import countersign_settings
from .hashers import generate_secret
from .models import Agent, ScopePolicy
from .oauth.client_metadata import ClientMetadata, InvalidClientMetadata, InvalidRedirectUri, is_loopback_host


def is_development() -> bool:
    """An http issuer on a loopback host: the development server, never a deployment."""
    issuer = urlsplit(countersign_settings.ISSUER)
    return issuer.scheme == "http" and is_loopback_host(issuer.hostname)


def initial_status() -> str:
    return Agent.Status.ACTIVE if is_development() else Agent.Status.PENDING_REVIEW


def allowed_scopes(asked: list[str]) -> list[str]:
    """The scopes policy lets a self-described agent hold, narrowed to those its metadata names (if any)."""
    policy = list(countersign_settings.SELF_DESCRIBED_SCOPES)
    known = list(ScopePolicy.objects.order_by("name").values_list("name", flat=True))
    allowed = [s for s in known if not policy or s in policy]
    return [s for s in allowed if s in asked] if asked else allowed


def _checked(agent: Agent) -> None:
    """The registry's own checks (DOT's: e.g. redirect URI schemes allowed in this deployment), as the
    RFC 7591 §3.2.2 error they amount to."""
    try:
        agent.full_clean(exclude=["client_secret", "user"])
    except ValidationError as exc:
        fields = exc.message_dict if hasattr(exc, "error_dict") else {"": exc.messages}
        text = "; ".join(f"{k}: {' '.join(v)}" if k else " ".join(v) for k, v in fields.items())[:200]
        if "redirect_uris" in fields:
            raise InvalidRedirectUri(f"Redirect URIs refused here: {text}") from exc
        raise InvalidClientMetadata(f"Client metadata refused: {text}") from exc


def _display_name(metadata: ClientMetadata, host: str) -> str:
    return (metadata.name or host or "Unnamed agent")[:200]


def _fields(metadata: ClientMetadata, *, host: str) -> dict[str, Any]:
    return {
        "name": _display_name(metadata, host),
        "publisher": f"self-asserted by {host}"[:200] if host else "self-asserted",
        "redirect_uris": " ".join(metadata.redirect_uris),
        "allowed_scopes": allowed_scopes(metadata.scope),
        "client_metadata": metadata.document,
    }


@transaction.atomic
def agent_from_document(
    *,
    client_id: str,
    metadata: ClientMetadata,
    expires_at: datetime,
    jwks: dict[str, Any] | None = None,
    request: HttpRequest | None = None,
) -> tuple[Agent, bool]:
    """Create, or refresh from a newly fetched document, the agent a metadata document describes.

    An admin's decisions stand: a refresh never changes the status (a suspended agent stays
    suspended, an activated one active) and never widens the scopes beyond policy.
    """
    host = urlsplit(client_id).hostname or ""
    agent = Agent.objects.select_for_update().filter(client_id=client_id).first()
    fields = _fields(metadata, host=host)
    # private_key_jwt (with the keys from its jwks_uri): a confidential client with no secret at all.
    fields |= {"jwks": jwks, "client_type": Agent.CLIENT_CONFIDENTIAL if jwks else Agent.CLIENT_PUBLIC}
    if agent is not None:
        if agent.registration != Agent.Registration.METADATA_DOCUMENT:
            raise ValueError("client_id belongs to an agent registered otherwise")
        changed = {k: v for k, v in fields.items() if getattr(agent, k) != v}
        for name, value in {**changed, "metadata_expires_at": expires_at}.items():
            setattr(agent, name, value)
        agent.save(update_fields=[*changed, "metadata_expires_at", "updated"])
        if changed:
            audit_record(
                event="agent.metadata_refreshed",
                actor=f"agent:{client_id}",
                client_id=client_id[:100],
                request=request,
                detail={"changed": sorted(changed)},
            )
        return agent, False
    agent = Agent(
        client_id=client_id,
        client_secret="",
        hash_client_secret=False,
        authorization_grant_type=Agent.GRANT_AUTHORIZATION_CODE,
        status=initial_status(),
        registration=Agent.Registration.METADATA_DOCUMENT,
        metadata_source=client_id[:300],
        metadata_expires_at=expires_at,
        **fields,
    )
    _checked(agent)
    agent.save()
    audit_record(
        event="agent.self_described",
        actor=f"agent:{client_id}",
        client_id=client_id[:100],
        request=request,
        detail={
            "registration": agent.registration,
            "status": agent.status,
            "name": agent.name,
            "scopes": agent.allowed_scopes,
            "redirect_uris": metadata.redirect_uris,
        },
    )
    return agent, True


@transaction.atomic
def agent_register(
    *, metadata: ClientMetadata, source: str, request: HttpRequest | None = None
) -> tuple[Agent, str]:
    """RFC 7591 §3.2.1: register a self-described agent. Returns it with its client secret ("" for a
    public client), which is shown this once and stored hashed."""
    host = urlsplit(metadata.redirect_uris[0]).hostname or ""
    secret = "" if metadata.is_public else generate_secret()
    agent = Agent(
        client_id=f"dyn_{secrets.token_urlsafe(18)}",
        client_type=Agent.CLIENT_PUBLIC if metadata.is_public else Agent.CLIENT_CONFIDENTIAL,
        client_secret=secret,
        hash_client_secret=not metadata.is_public,
        authorization_grant_type=Agent.GRANT_AUTHORIZATION_CODE,
        status=initial_status(),
        registration=Agent.Registration.DYNAMIC,
        metadata_source=f"registration from {source}"[:300],
        **_fields(metadata, host=host),
    )
    _checked(agent)
    agent.save()
    audit_record(
        event="agent.self_described",
        actor=f"agent:{agent.client_id}",
        client_id=agent.client_id,
        request=request,
        detail={
            "registration": agent.registration,
            "status": agent.status,
            "name": agent.name,
            "scopes": agent.allowed_scopes,
            "redirect_uris": metadata.redirect_uris,
            "token_endpoint_auth_method": metadata.auth_method,
        },
    )
    return agent, secret

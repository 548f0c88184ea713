"""The agent registry as resource servers see it (the second principal of dual authentication).

Per agent: status, publisher and the RFC 7638 thumbprints of its registered keys,
so a resource server can refuse a suspended or unknown ``act.sub`` and check
that a DPoP proof was made with a key the agent registered. Asked about one instance of
the agent on one grant (``act.instance``, ``grant_id``), the entry adds that instance's state
and key thumbprint (``instance_entry``), so a cut-off instance is refused there too.
"""

import time
from typing import Any
from uuid import UUID

from .conf import countersign_settings
from .models import Agent, AgentInstance
from .oauth.dpop import registered_thumbprints
from .tokens import actor_id, sign

REGISTRY_DOCUMENT_TYP = "agent-registry+jwt"
REGISTRY_DOCUMENT_TTL = 60


def agent_entry(agent: Agent) -> dict[str, Any]:
    return {
        "client_id": agent.client_id,
        "actor": actor_id(agent.client_id),
        "name": agent.name,
        "publisher": agent.publisher,
        "status": agent.status,
        "jkt": sorted(registered_thumbprints(agent)),
        "require_dpop": agent.require_dpop,
        "updated": int(agent.updated.timestamp()),
    }


def registry_document() -> str:
    """Every agent, signed with our current key: cacheable, verifiable against the JWKS."""
    now = int(time.time())
    claims = {
        "iss": countersign_settings.ISSUER,
        "iat": now,
        "exp": now + REGISTRY_DOCUMENT_TTL,
        "agents": [agent_entry(a) for a in Agent.objects.order_by("client_id")],
    }
    return sign(claims, typ=REGISTRY_DOCUMENT_TYP)


def instance_entry(agent: Agent, *, instance: str, grant_id: str) -> dict[str, Any]:
    """One instance of ``agent`` on one grant: ``status`` (``active``, ``cut_off``, or ``unknown``) and
    ``jkt``, the thumbprint of the key its attestation vouched for (its DPoP key)."""
    row = None
    try:
        grant_uuid: UUID | None = UUID(grant_id) if len(grant_id) == 36 else None
    except ValueError:
        grant_uuid = None
    if grant_uuid is not None:
        row = (
            AgentInstance.objects.filter(agent=agent, grant_id=grant_uuid, instance_id=instance[:64])
            .values_list("status", "jkt")
            .first()
        )
    status, jkt = row if row is not None else ("unknown", "")
    return {"id": instance, "grant_id": grant_id, "status": status, "jkt": jkt}

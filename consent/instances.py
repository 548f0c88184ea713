"""Agent instances: many running copies of one registered agent, each told apart and each stoppable.

An instance authenticates with a Client Attestation the agent's registered key signed for the
instance's own key (draft-ietf-oauth-attestation-based-client-auth, ``consent.oauth.attestation``).
Its tokens carry ``act: {"sub": "agent:<client_id>", "instance": "<id>"}`` (RFC 8693 §4.1 lets
``act`` carry more than ``sub``). The record of an instance (``AgentInstance``) is per session
grant, so a person who cuts off an instance on their connection affects no one else's.

Cost on the hot path: an agent that runs as one never reaches this module (no statement). An
instance costs one statement per token or backchannel request (``instance_admit``: insert on first
use, else touch ``last_seen``, both only while the instance is active and holds the same key); the
answer is never cached, so a cut-off counts at once on every node. Collecting an action token,
redemption and introspection read the instance's state in the statement they run anyway.
"""

from datetime import datetime
from typing import Any

from celery import current_app
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record, audit_refusal

from . import rows
from .errors import InstanceCutOff, InvalidClient
from .models import Agent, AgentInstance, SessionGrant
from .oauth.attestation import InstanceProof
from .signals import instance_cut_off

_TABLE = rows.table(AgentInstance)
_ADMIT = (
    f"INSERT INTO {_TABLE} (agent_id, grant_id, instance_id, jkt, status, first_seen, last_seen,"
    f" cut_off_at, cut_off_by) VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, '')"
    f" ON CONFLICT (grant_id, instance_id) DO UPDATE SET last_seen = EXCLUDED.last_seen"
    f" WHERE {_TABLE}.status = %s AND {_TABLE}.jkt = EXCLUDED.jkt"
    f" RETURNING CASE WHEN first_seen = last_seen THEN 1 ELSE 0 END"
)  # 1: inserted by this statement


class InstanceNotActive(Exception):
    """The instance is not one of this person's, or was cut off already."""


def act_claim(client_id: str, instance: str = "") -> dict[str, str]:
    """RFC 8693 §4.1 ``act`` for the agent, naming the instance when there is one."""
    act = {"sub": f"agent:{client_id}"}
    if instance:
        act["instance"] = instance
    return act


def instance_of(claims: dict[str, Any]) -> str:
    """The instance a token of ours names (``act.instance``), "" for an agent that runs as one."""
    act = claims.get("act")
    instance = act.get("instance") if isinstance(act, dict) else None
    return instance if isinstance(instance, str) else ""


def refuse_cut_off(
    *, agent: Agent, grant_id: Any, user_id: int, instance: str, where: str, request: Any = None
) -> InstanceCutOff:
    """The one audit row of a cut-off instance's refused request, in its person's trail; the refusal."""
    audit_refusal(
        event="agent_instance.refused",
        error="invalid_client",
        actor=agent.actor_id,
        user_id=user_id,
        client_id=agent.client_id,
        grant_id=grant_id,
        request=request,
        detail={"instance": instance, "reason": "instance_cut_off", "where": where},
    )
    return InstanceCutOff(
        "This instance of the agent was cut off from this connection.",
        reason="instance cut off",
        audited=True,
    )


def instance_admit(
    *,
    agent: Agent,
    grant: SessionGrant,
    proof: InstanceProof,
    where: str,
    now: datetime | None = None,
    request: Any = None,
) -> None:
    """Let ``proof``'s instance act on ``grant``, recording it on first use (audited).

    One statement; refused (nothing changed, one audit row) when the instance was cut off, or when
    its id comes with another key than the one it first proved (``invalid_client``).
    """
    now = now or timezone.now()
    at = rows.param(AgentInstance, "first_seen", now)
    row = rows.fetchone(
        _ADMIT,
        [
            agent.pk,
            rows.param(AgentInstance, "grant", grant.pk),
            proof.instance,
            proof.jkt,
            AgentInstance.Status.ACTIVE,
            at,
            at,
            AgentInstance.Status.ACTIVE,
        ],
    )
    if row is not None:
        if row[0]:  # the instance is new
            audit_record(
                event="agent_instance.created",
                actor=agent.actor_id,
                user_id=grant.user_id,
                client_id=agent.client_id,
                grant_id=grant.pk,
                request=request,
                detail={"instance": proof.instance, "jkt": proof.jkt},
            )
        return
    status = (
        AgentInstance.objects.filter(grant_id=grant.pk, instance_id=proof.instance)
        .values_list("status", flat=True)
        .first()
    )
    if status == AgentInstance.Status.CUT_OFF:
        raise refuse_cut_off(
            agent=agent,
            grant_id=grant.pk,
            user_id=grant.user_id,
            instance=proof.instance,
            where=where,
            request=request,
        )
    raise InvalidClient(reason=f"instance {proof.instance} proved another key than on its first use")


def agent_instance_cut_off(
    *, instance_pk: Any, by: str, user_id: int | None = None, grant_id: Any = None, request: Any = None
) -> AgentInstance:
    """ACTIVE -> CUT_OFF for one instance on one grant: its later requests are refused everywhere,
    and its open step-up requests are cancelled (``consent.signals.instance_cut_off``).

    ``by`` is who did it (``user:<pk>``, ``admin:<name>``); with ``user_id`` only an instance on that
    person's grant (and with ``grant_id``, only on that grant). The guarded UPDATE decides a race;
    raises ``InstanceNotActive`` otherwise.
    """
    now = timezone.now()
    filters: dict[str, Any] = {"pk": instance_pk, "status": AgentInstance.Status.ACTIVE}
    if user_id is not None:
        filters["grant__user_id"] = user_id
    if grant_id is not None:
        filters["grant_id"] = grant_id
    with transaction.atomic():
        moved = AgentInstance.objects.filter(**filters).update(
            status=AgentInstance.Status.CUT_OFF, cut_off_at=now, cut_off_by=by[:100]
        )
        if moved != 1:
            raise InstanceNotActive(str(instance_pk))
        instance: AgentInstance = AgentInstance.objects.select_related("agent", "grant").get(pk=instance_pk)
        audit_record(
            event="agent_instance.cut_off",
            actor=by,
            user_id=instance.grant.user_id,
            client_id=instance.agent.client_id,
            grant_id=instance.grant_id,
            request=request,
            detail={"instance": instance.instance_id},
        )
        instance_cut_off.send(
            sender=AgentInstance,
            grant_id=instance.grant_id,
            instance=instance.instance_id,
            actor=by,
            user_id=instance.grant.user_id,
        )
        grant_id, owner = str(instance.grant_id), instance.grant.user_id
        # By its registered name (approvals.tasks): an open story page of the grant re-reads itself.
        transaction.on_commit(
            lambda: current_app.tasks["approvals.push_grant_changed"].delay(grant_id, owner), robust=True
        )
    return instance


def instances_for_grant(*, grant_id: Any) -> list[AgentInstance]:
    return list(AgentInstance.objects.filter(grant_id=grant_id).order_by("first_seen", "pk"))


def short_instance(instance: str) -> str:
    """How a person reads an instance id: "3f9c…" (the whole id is on the record)."""
    return AgentInstance.short(instance)

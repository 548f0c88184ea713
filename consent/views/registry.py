"""Agent registry for resource servers: one agent (authenticated) and the signed document."""

from django.http import HttpRequest, HttpResponse, JsonResponse

from ..errors import NotFound
from ..http import NO_STORE, error_response
from ..models import Agent
from ..registry import REGISTRY_DOCUMENT_TTL, agent_entry, instance_entry, registry_document
from .rs_auth import resource_server_or_refusal


def agent_view(request: HttpRequest, client_id: str) -> HttpResponse:
    rs, refusal = resource_server_or_refusal(request, event="registry.refused")
    if refusal is not None:
        return refusal
    assert rs is not None  # no refusal: the resource server authenticated
    agent = Agent.objects.filter(client_id=client_id[:255]).first()
    if agent is None:
        return error_response(NotFound("no such agent"))
    # Suspension must be visible at once: no caching here (the signed document is the cacheable form).
    entry = agent_entry(agent)
    instance = request.GET.get("instance", "")
    if instance:  # one instance on one grant (act.instance, grant_id): cut off there, or not
        entry["instance"] = instance_entry(agent, instance=instance, grant_id=request.GET.get("grant_id", ""))
    return JsonResponse(entry, headers=NO_STORE)


def registry_document_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(
        registry_document(),
        content_type="application/jwt",
        headers={"Cache-Control": f"public, max-age={REGISTRY_DOCUMENT_TTL // 2}"},
    )

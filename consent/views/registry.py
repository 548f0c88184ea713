"""Agent registry for resource servers: one agent (authenticated) and the signed document."""

from django.http import HttpResponse, JsonResponse

from audit.services import audit_refusal

from ..http import NO_STORE, claimed_client_id, client_credentials, oauth_error
from ..models import Agent
from ..registry import REGISTRY_DOCUMENT_TTL, agent_entry, registry_document
from ..selectors import resource_server_authenticate


def agent_view(request, client_id: str):
    creds = client_credentials(request)
    rs = resource_server_authenticate(client_id=creds[0], secret=creds[1]) if creds else None
    if rs is None:
        audit_refusal(event="registry.refused", error="invalid_client", actor="", client_id=claimed_client_id(request),
                      request=request, detail={"reason": "resource-server authentication failed"})
        return oauth_error("invalid_client", "Resource-server authentication failed.", status=401)
    agent = Agent.objects.filter(client_id=client_id[:255]).first()
    if agent is None:
        return JsonResponse({"error": "not_found", "error_description": "no such agent"}, status=404,
                            headers=NO_STORE)
    # Suspension must be visible at once: no caching here (the signed document is the cacheable form).
    return JsonResponse(agent_entry(agent), headers=NO_STORE)


def registry_document_view(request):
    return HttpResponse(registry_document(), content_type="application/jwt",
                        headers={"Cache-Control": f"public, max-age={REGISTRY_DOCUMENT_TTL // 2}"})

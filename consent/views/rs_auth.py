"""Resource-server authentication for the endpoints downstream systems call."""

from django.http import HttpRequest, HttpResponse

from audit.services import audit_refusal

from ..errors import InvalidClient
from ..http import claimed_client_id, client_credentials, error_response
from ..models import ResourceServer
from ..selectors import resource_server_authenticate


def resource_server_or_refusal(
    request: HttpRequest, *, event: str, cached: bool = False
) -> tuple[ResourceServer | None, HttpResponse | None]:
    """The authenticated resource server, or the audited 401 to send instead (``cached``: see
    ``resource_server_authenticate``)."""
    creds = client_credentials(request)
    rs = resource_server_authenticate(client_id=creds[0], secret=creds[1], cached=cached) if creds else None
    if rs is not None:
        return rs, None
    return None, resource_server_refusal(request, event=event)


def resource_server_confirmed(request: HttpRequest) -> bool:
    """Whether the request's resource-server credentials hold now, checked in the database (for an
    answer that no statement of the request re-checked after a cached verification)."""
    creds = client_credentials(request)
    return creds is not None and resource_server_authenticate(client_id=creds[0], secret=creds[1]) is not None


def resource_server_refusal(request: HttpRequest, *, event: str) -> HttpResponse:
    """The audited 401 of a request whose resource-server credentials do not hold."""
    audit_refusal(
        event=event,
        error="invalid_client",
        actor="",
        client_id=claimed_client_id(request),
        request=request,
        detail={"reason": "resource-server authentication failed"},
    )
    return error_response(InvalidClient("Resource-server authentication failed."))

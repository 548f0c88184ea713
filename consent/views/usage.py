"""The usage endpoint: resource servers report the session-token uses they accepted.

POST ``/o/usage/`` with the resource server's credentials (as for RFC 7662 §2.1
introspection) and a JSON body ``{"uses": [{"id", "jti", "scope", "operation", "outcome",
"at"}, ...]}`` (at most 100). All or nothing: a malformed batch is ``invalid_request``, a use
of a token not issued for this resource server is ``invalid_target`` (RFC 8707 §2), and
nothing of it is stored. A repeated ``id`` counts once.
"""

import json

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from audit.services import audit_refusal

from ..errors import InvalidRequest, OAuthError
from ..http import NO_STORE, error_response
from ..limits.jsonbounds import check
from ..usage import grant_uses_record
from .rs_auth import resource_server_or_refusal

MAX_BODY = 64 * 1024


@csrf_exempt
def usage_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    rs, refusal = resource_server_or_refusal(request, event="usage.refused")
    if refusal is not None:
        return refusal
    assert rs is not None  # no refusal: the resource server authenticated
    try:
        if request.content_type != "application/json":
            raise InvalidRequest("the body must be application/json")
        try:
            check(request.body, max_bytes=MAX_BODY, what="the usage report")
            body = json.loads(request.body)
        except ValueError as exc:
            raise InvalidRequest(f"the body is not a bounded JSON object ({exc})") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object with a uses array")
        result = grant_uses_record(resource_server=rs, uses=body.get("uses"))
    except OAuthError as exc:
        audit_refusal(
            event="usage.refused",
            error=exc.error,
            actor=f"rs:{rs.client_id}",
            client_id=rs.client_id,
            request=request,
            detail={"reason": exc.reason[:200]},
        )
        return error_response(exc)
    return JsonResponse({"accepted": result.accepted, "duplicates": result.duplicates}, headers=NO_STORE)

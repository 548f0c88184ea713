"""OAuth 2.0 Dynamic Client Registration (RFC 7591 §3), under the admin's policy.

https://www.rfc-editor.org/rfc/rfc7591#section-3

``POST /o/register/`` with a JSON client metadata object (§3.1). Policy
(``COUNTERSIGN["CLIENT_REGISTRATION"]``): ``open``; ``initial_access_token`` (§3: a bearer token,
RFC 6750 §2.1, one of ``REGISTRATION_ACCESS_TOKENS``); or ``off`` (the endpoint is not advertised
and refuses). The body is bounded in size and depth before it is parsed; the endpoint is
rate-limited per source (``RATE_LIMITS["registration"]``). Success is §3.2.1 (201, the
``client_id``, a ``client_secret`` for confidential clients, and the metadata as registered);
every refusal is §3.2.2 JSON (``invalid_client_metadata``, ``invalid_redirect_uri``), changes
nothing, and is audited once. Registered agents are self-described (``consent.selfdescribed``).
"""

import hmac
import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from audit.services import audit_refusal, client_ip
from consent.limits.jsonbounds import JSONTooDeep, JSONTooLarge, check

from ..conf import countersign_settings
from ..errors import AccessDenied, MethodNotAllowed, OAuthError
from ..http import NO_STORE, error_response
from ..oauth.client_metadata import InvalidClientMetadata, parse
from ..selfdescribed import agent_register

MAX_BODY = 8192


class InvalidToken(OAuthError):
    """RFC 6750 §3.1: the initial access token is missing, or not one the admin issued."""

    error = "invalid_token"
    status_code = 401


class RegistrationOff(AccessDenied):
    """Dynamic registration is switched off by the administrator."""

    status_code = 403


def _check_policy(request: HttpRequest) -> None:
    policy = countersign_settings.CLIENT_REGISTRATION
    if policy == "open":
        return
    if policy == "initial_access_token":
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        if (
            scheme.lower() == "bearer"
            and presented
            and any(
                hmac.compare_digest(presented, str(t).encode())
                for t in countersign_settings.REGISTRATION_ACCESS_TOKENS
            )
        ):
            return
        raise InvalidToken(
            "An initial access token is required to register.", reason="initial access token wrong"
        )
    raise RegistrationOff("Dynamic client registration is not offered here.", reason="registration is off")


def _metadata(request: HttpRequest) -> object:
    if request.content_type != "application/json":
        raise InvalidClientMetadata("The body must be application/json (RFC 7591 §3.1).")
    body = request.body
    try:
        check(body, max_bytes=MAX_BODY, what="client metadata")
        raw = json.loads(body)
    except (JSONTooLarge, JSONTooDeep, ValueError) as exc:
        raise InvalidClientMetadata(
            "The body must be a JSON object within bounds.", reason=str(exc)[:100]
        ) from exc
    return raw


@csrf_exempt
def registration_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return error_response(MethodNotAllowed("POST only."), headers={"Allow": "POST"})
    try:
        _check_policy(request)
        metadata = parse(_metadata(request), secrets_allowed=True)
        agent, secret = agent_register(
            metadata=metadata, source=client_ip(request) or "unknown", request=request
        )
    except OAuthError as exc:
        audit_refusal(
            event="registration.refused",
            error=exc.error,
            actor="",
            request=request,
            detail={"reason": exc.reason or exc.description},
        )
        headers = (
            {"WWW-Authenticate": 'Bearer realm="countersign", error="invalid_token"'}
            if isinstance(exc, InvalidToken)
            else None
        )
        return error_response(exc, headers=headers)
    body = {
        **metadata.document,
        "client_id": agent.client_id,
        "client_id_issued_at": int(agent.created.timestamp()),
        "client_name": agent.name,
        "scope": " ".join(agent.allowed_scopes),
    }
    if secret:
        body.update(client_secret=secret, client_secret_expires_at=0)
    return JsonResponse(body, status=201, headers=NO_STORE)

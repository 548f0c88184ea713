"""The token endpoint (RFC 6749 §3.2), on a path of our own.

https://www.rfc-editor.org/rfc/rfc6749#section-3.2

It does what the RFC sections ask and nothing else: parse the form (a parameter
given twice is refused, §3.2), check a DPoP proof if one is sent (RFC 9449 §4.3),
hand the request to the grant registered for its ``grant_type``
(``COUNTERSIGN["TOKEN_GRANTS"]``; anything else is ``unsupported_grant_type``,
§5.2), and answer: the grant's body with ``Cache-Control: no-store`` (§5.1), or its
refusal, rendered once here and audited once.
"""

from functools import cache
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.utils.module_loading import import_string
from django.views.decorators.csrf import csrf_exempt

from audit.services import audit_refusal

from ..conf import countersign_settings
from ..errors import InvalidClient, InvalidRequest, OAuthError, UnsupportedGrantType
from ..grants.issue import TokenRequest
from ..http import FORM, NO_STORE, ProtocolJsonResponse, claimed_client_id, error_response, form_pairs
from ..oauth.client_auth import Credentials, presented_credentials
from ..oauth.dpop import dpop_headers, verify_proof

# RFC 8707 §2: ``resource`` may be given more than once; kept space-joined (an absolute URI has no space).
REPEATABLE = {"resource"}
# Not a refusal: the normal answer while the user has not decided (CIBA Core §11).
NOT_AUDITED = {"authorization_pending"}


@cache
def token_grants() -> dict[str, Any]:
    """grant_type -> handler(TokenRequest) -> response body, from ``COUNTERSIGN["TOKEN_GRANTS"]``."""
    return {grant_type: import_string(path) for grant_type, path in countersign_settings.TOKEN_GRANTS.items()}


def form_params(request: HttpRequest) -> dict[str, str]:
    """The form body as single values; RFC 6749 §3.2: no parameter more than once.

    Parsed by ``consent.http.form_pairs`` rather than through ``request.POST`` (a ``QueryDict`` of
    lists, a third of the cost of the view's own work): the same limits apply
    (``DATA_UPLOAD_MAX_MEMORY_SIZE`` through ``request.body``, ``DATA_UPLOAD_MAX_NUMBER_FIELDS``) and
    the same decoding (UTF-8, a bad byte replaced); a body of another content type has no
    parameters (RFC 6749 §4.1.3: form-encoded). Only ``resource`` may repeat (RFC 8707 §2).
    """
    if request.content_type != FORM:
        return {}
    try:
        pairs = form_pairs(request)
    except ValueError as exc:
        raise InvalidRequest(f"More than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} parameters.") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            if name in REPEATABLE:
                params[name] = f"{params[name]} {value}"
                continue
            raise InvalidRequest(f"Duplicate {name} parameter.")
        params[name] = value
    return params


def _token_request(request: HttpRequest, params: dict[str, str], uri: str) -> TokenRequest:
    presented: Credentials | InvalidClient
    try:
        presented = presented_credentials(
            params,
            request.META.get("HTTP_AUTHORIZATION", ""),
            attestation=request.META.get("HTTP_OAUTH_CLIENT_ATTESTATION"),
            pop=request.META.get("HTTP_OAUTH_CLIENT_ATTESTATION_POP"),
        )
    except InvalidClient as exc:
        presented = exc
    proof = request.META.get("HTTP_DPOP")
    jkt = verify_proof(proof, htm="POST", htu=uri) if proof is not None else ""
    return TokenRequest(params=params, presented=presented, uri=uri, dpop_jkt=jkt)


@csrf_exempt
def token_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    uri = f"{countersign_settings.ISSUER}/o/token/"
    params: dict[str, str] = {}
    try:
        params = form_params(request)
        token_request = _token_request(request, params, uri)
        grant_type = params.get("grant_type")
        if not grant_type:
            raise InvalidRequest("Missing grant_type parameter.")
        grant = token_grants().get(grant_type)
        if grant is None:
            raise UnsupportedGrantType(reason=f"grant type {grant_type[:100]!r} is not supported")
        body = grant(token_request)
    except OAuthError as exc:
        if not exc.audited and exc.error not in NOT_AUDITED:
            audit_refusal(
                event="token.refused",
                error=exc.error,
                actor="",
                client_id=claimed_client_id(request),
                request=request,
                detail={"reason": exc.reason, "grant_type": params.get("grant_type", "")},
            )
        return error_response(exc, headers=dpop_headers())
    return ProtocolJsonResponse(body, headers={**NO_STORE, **dpop_headers()})

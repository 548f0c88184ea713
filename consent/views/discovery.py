"""Discovery: RFC 8414 metadata, OpenID Provider metadata, and the JWKS (RFC 7517)."""

from django.http import HttpRequest, HttpResponse, JsonResponse

from ..keys import jwks
from ..metadata import server_metadata


def metadata_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse(server_metadata(), headers={"Cache-Control": "public, max-age=300"})


def jwks_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse(jwks(), headers={"Cache-Control": "public, max-age=60"})

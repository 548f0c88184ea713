"""Agent (client) authentication outside oauthlib's own endpoints.

The backchannel endpoint must authenticate agents exactly as the token endpoint
does (CIBA Core §7.1), so it asks the same validator.
"""

from urllib.parse import urlencode

from oauth2_provider.oauth2_backends import get_oauthlib_core
from oauthlib.common import Request as OAuthlibRequest
from oauthlib.oauth2.rfc6749.errors import OAuth2Error

from ..models import Agent


def authenticate_agent(request) -> Agent | None:
    headers = {}
    if "HTTP_AUTHORIZATION" in request.META:
        headers["HTTP_AUTHORIZATION"] = request.META["HTTP_AUTHORIZATION"]  # DOT reads the META key
    oauth_request = OAuthlibRequest(request.build_absolute_uri(), http_method="POST",
                                    body=urlencode(list(request.POST.items())), headers=headers)
    validator = get_oauthlib_core().server.request_validator
    try:
        if not validator.authenticate_client(oauth_request):
            return None
    except OAuth2Error:
        return None
    return oauth_request.client

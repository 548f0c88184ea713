"""The OAuth 2.0 server: the grant types Countersign supports, and nothing else.

Built from oauthlib's endpoints rather than its all-in-one ``Server`` so that no
grant we do not want (implicit, password, client credentials, device) is
reachable. oauthlib routes an unknown ``grant_type`` to the default handler, so
the token endpoint refuses unregistered grant types itself (RFC 6749 §5.2
``unsupported_grant_type``).

- Authorization code with PKCE, S256 only (RFC 6749 §4.1, RFC 7636 §4.2,
  RFC 9700 §2.1.1).
- Refresh token with rotation (RFC 6749 §6, RFC 9700 §4.14.2), issued only to
  agents whose refresh mode is ``rotating``.
- OpenID CIBA (``urn:openid:params:grant-type:ciba``), which yields action
  tokens for approved step-up requests (``consent.grants.ciba``).
- RFC 8693 token exchange, for re-minting and delegation
  (``consent.grants.token_exchange``).
"""

from oauthlib.oauth2.rfc6749 import errors
from oauthlib.oauth2.rfc6749.endpoints import (
    AuthorizationEndpoint,
    IntrospectEndpoint,
    ResourceEndpoint,
    RevocationEndpoint,
    TokenEndpoint,
)
from oauthlib.oauth2.rfc6749.endpoints.base import catch_errors_and_unavailability
from oauthlib.oauth2.rfc6749.grant_types import AuthorizationCodeGrant, RefreshTokenGrant
from oauthlib.oauth2.rfc6749.grant_types.authorization_code import code_challenge_method_s256
from oauthlib.oauth2.rfc6749.tokens import BearerToken

from ..grants.ciba import GRANT_TYPE_CIBA, CibaGrant
from ..grants.token_exchange import GRANT_TYPE_TOKEN_EXCHANGE, TokenExchangeGrant
from ..models import Agent
from ..tokens import token_type

GRANT_AUTHORIZATION_CODE = "authorization_code"
GRANT_REFRESH_TOKEN = "refresh_token"
SUPPORTED_GRANT_TYPES = (GRANT_AUTHORIZATION_CODE, GRANT_REFRESH_TOKEN, GRANT_TYPE_CIBA, GRANT_TYPE_TOKEN_EXCHANGE)


class S256AuthorizationCodeGrant(AuthorizationCodeGrant):
    """RFC 7636 with the ``plain`` method removed (RFC 9700 §2.1.1)."""

    _code_challenge_methods = {"S256": code_challenge_method_s256}

    def validate_token_request(self, request):
        try:
            super().validate_token_request(request)
        except errors.MismatchingRedirectURIError as exc:
            # RFC 6749 §5.2: a redirect_uri that does not match the authorization request is
            # invalid_grant (oauthlib answers invalid_request).
            raise errors.InvalidGrantError(description="redirect_uri does not match the authorization request.",
                                           request=request) from exc


class SessionBearerToken(BearerToken):
    """Issues a refresh token only to agents in ``rotating`` refresh mode."""

    def create_token(self, request, refresh_token=False, **kwargs):
        wants_refresh = refresh_token and request.client.refresh_mode == Agent.RefreshMode.ROTATING
        token = super().create_token(request, refresh_token=wants_refresh, **kwargs)
        token["token_type"] = token_type()
        return token


def session_token_lifetime(request) -> int:
    """The agent's access-token TTL, never past the end of the session grant."""
    ttl = request.client.access_token_ttl
    grant = getattr(request, "session_grant", None)
    if grant is not None:
        from django.utils import timezone

        remaining = int((grant.expires_at - timezone.now()).total_seconds())
        ttl = max(1, min(ttl, remaining))
    return ttl


class CountersignServer(
    AuthorizationEndpoint, TokenEndpoint, ResourceEndpoint, RevocationEndpoint, IntrospectEndpoint
):
    def __init__(self, request_validator, token_generator=None, refresh_token_generator=None, **kwargs):
        auth_grant = S256AuthorizationCodeGrant(request_validator)
        refresh_grant = RefreshTokenGrant(request_validator, issue_new_refresh_tokens=True)
        bearer = SessionBearerToken(
            request_validator, token_generator, session_token_lifetime, refresh_token_generator
        )
        AuthorizationEndpoint.__init__(
            self, default_response_type="code", response_types={"code": auth_grant},
            default_token_type=bearer,
        )
        TokenEndpoint.__init__(
            self, default_grant_type=GRANT_AUTHORIZATION_CODE,
            grant_types={GRANT_AUTHORIZATION_CODE: auth_grant, GRANT_REFRESH_TOKEN: refresh_grant,
                         GRANT_TYPE_CIBA: CibaGrant(request_validator),
                         GRANT_TYPE_TOKEN_EXCHANGE: TokenExchangeGrant(request_validator)},
            default_token_type=bearer,
        )
        ResourceEndpoint.__init__(self, default_token="Bearer", token_types={"Bearer": bearer})
        RevocationEndpoint.__init__(self, request_validator, supported_token_types=["access_token", "refresh_token"])
        IntrospectEndpoint.__init__(self, request_validator)

    @catch_errors_and_unavailability
    def create_token_response(self, uri, http_method="POST", body=None, headers=None,
                              credentials=None, grant_type_for_scope=None, claims=None):
        from oauthlib.common import Request

        probe = Request(uri, http_method=http_method, body=body, headers=headers)
        if probe.grant_type not in self.grant_types:
            error = (errors.InvalidRequestError(description="Missing grant_type parameter.")
                     if not probe.grant_type else errors.UnsupportedGrantTypeError())
            return {"Content-Type": "application/json", "Cache-Control": "no-store",
                    "Pragma": "no-cache"}, error.json, error.status_code
        return super().create_token_response(uri, http_method, body, headers, credentials,
                                             grant_type_for_scope, claims)

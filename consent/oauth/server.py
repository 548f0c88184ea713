"""The OAuth 2.0 authorization endpoint's server: the authorization code response type, and nothing else.

Built from oauthlib's ``AuthorizationEndpoint`` rather than its all-in-one
``Server`` so that no response type we do not want (implicit, hybrid) is
reachable. The token and revocation endpoints do not go through oauthlib: they
have paths of their own (``consent.views.token``, ``consent.views.revocation``),
and the token endpoint's grants are registered in ``COUNTERSIGN["TOKEN_GRANTS"]``.

- Authorization code with PKCE, S256 only (RFC 6749 §4.1, RFC 7636 §4.2,
  RFC 9700 §2.1.1).
"""

from typing import Any

from oauthlib.oauth2.rfc6749.endpoints import AuthorizationEndpoint
from oauthlib.oauth2.rfc6749.grant_types import AuthorizationCodeGrant
from oauthlib.oauth2.rfc6749.grant_types.authorization_code import code_challenge_method_s256
from oauthlib.oauth2.rfc6749.request_validator import RequestValidator
from oauthlib.oauth2.rfc6749.tokens import BearerToken


class S256AuthorizationCodeGrant(AuthorizationCodeGrant):
    """RFC 7636 with the ``plain`` method removed (RFC 9700 §2.1.1)."""

    _code_challenge_methods = {"S256": code_challenge_method_s256}


class CountersignServer(AuthorizationEndpoint):
    def __init__(
        self,
        request_validator: RequestValidator,
        token_generator: object = None,
        refresh_token_generator: object = None,
        **kwargs: Any,
    ) -> None:
        AuthorizationEndpoint.__init__(
            self,
            default_response_type="code",
            response_types={"code": S256AuthorizationCodeGrant(request_validator)},
            # oauthlib takes the token type object here; its stubs say a name.
            default_token_type=BearerToken(request_validator),  # type: ignore[arg-type]
        )

"""OpenID Connect Client-Initiated Backchannel Authentication (CIBA) Core 1.0 — token request.

https://openid.net/specs/openid-client-initiated-backchannel-authentication-core-1_0.html

§10.1: the agent polls the token endpoint with
``grant_type=urn:openid:params:grant-type:ciba`` and its ``auth_req_id``,
authenticating as it does for every token request. The answer (§11) is
``authorization_pending``, ``slow_down``, ``access_denied``, ``expired_token``,
``invalid_grant`` — or, once the user approved, the one-shot action token. This
grant never mints a session token.
"""

import json

from oauthlib.oauth2.rfc6749 import errors
from oauthlib.oauth2.rfc6749.grant_types.base import GrantTypeBase

from ..errors import OAuthError
from ..oauth.context import note_refusal

GRANT_TYPE_CIBA = "urn:openid:params:grant-type:ciba"


class CibaGrant(GrantTypeBase):
    def create_token_response(self, request, token_handler):
        from approvals.services import approval_collect

        headers = self._get_default_headers()
        try:
            if not self.request_validator.authenticate_client(request):
                raise errors.InvalidClientError(request=request)
            auth_req_id = getattr(request, "auth_req_id", None)
            if not auth_req_id:
                raise errors.InvalidRequestError(description="Missing auth_req_id parameter.", request=request)
        except errors.OAuth2Error as exc:
            headers.update(exc.headers)
            return headers, exc.json, exc.status_code
        try:
            body = approval_collect(auth_req_id=auth_req_id, agent=request.client)
        except OAuthError as exc:
            note_refusal(exc.description)
            payload = {"error": exc.error}
            if exc.description:
                payload["error_description"] = exc.description
            return headers, json.dumps(payload), exc.status_code
        return headers, json.dumps(body), 200

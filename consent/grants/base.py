"""Extension grants (RFC 6749 §4.5) on oauthlib: client authentication, then the grant's answer."""

import json
from abc import ABC, abstractmethod

from oauthlib.oauth2.rfc6749 import errors
from oauthlib.oauth2.rfc6749.grant_types.base import GrantTypeBase

from ..errors import OAuthError
from ..oauth.context import note_refusal


class ExtensionGrant(GrantTypeBase, ABC):
    """An extension grant (RFC 6749 §4.5): authenticate the client, then ``respond``.

    Subclasses raise ``OAuthError`` for refusals; this renders them as token errors.
    """

    @abstractmethod
    def respond(self, request) -> dict:
        """The token response body for an authenticated client, or raise ``OAuthError``."""

    def create_token_response(self, request, token_handler):
        headers = self._get_default_headers()
        try:
            if not self.request_validator.authenticate_client(request):
                raise errors.InvalidClientError(request=request)
        except errors.OAuth2Error as exc:
            headers.update(exc.headers)
            return headers, exc.json, exc.status_code
        try:
            body = self.respond(request)
        except OAuthError as exc:
            note_refusal(exc.description)
            payload = {"error": exc.error}
            if exc.description:
                payload["error_description"] = exc.description
            return headers, json.dumps(payload), exc.status_code
        return headers, json.dumps(body), 200

"""The protocol error hierarchy: each error carries its OAuth error code, HTTP status and description.

Rendered in one place, ``consent.http.oauth_error``."""


class OAuthError(Exception):
    error = "invalid_request"
    status_code = 400

    def __init__(self, description: str = ""):
        super().__init__(description)
        self.description = description


class InvalidRequest(OAuthError):
    """RFC 6749 §5.2: a parameter is missing, malformed, or not allowed here."""

    error = "invalid_request"


class InvalidScope(OAuthError):
    """RFC 6749 §5.2: the requested scope is invalid, unknown, or exceeds what was granted."""

    error = "invalid_scope"


class ConfigurationError(OAuthError):
    """An admin asked for a configuration that cannot work."""


class AccessDenied(OAuthError):
    """RFC 6749 §4.1.2.1 / CIBA Core §11: the resource owner or server denied the request."""

    error = "access_denied"

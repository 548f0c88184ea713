"""Domain errors of the consent app, each carrying its OAuth error code."""


class ConsentError(Exception):
    error = "invalid_request"
    status_code = 400

    def __init__(self, description: str = ""):
        super().__init__(description)
        self.description = description


class InvalidScope(ConsentError):
    """RFC 6749 §5.2: the requested scope is invalid, unknown, or exceeds what was granted."""

    error = "invalid_scope"


class InvalidClient(ConsentError):
    """RFC 6749 §5.2: client authentication failed."""

    error = "invalid_client"
    status_code = 401


class GrantNotActive(ConsentError):
    """RFC 6749 §5.2 ``invalid_grant``: the session grant is revoked or expired."""

    error = "invalid_grant"


class ConfigurationError(ConsentError):
    """An admin asked for a configuration that cannot work."""

"""The protocol error hierarchy: each error carries its OAuth error code, HTTP status and description.

Rendered in one place, ``consent.http.oauth_error`` (and ``consent.http.error_response``
for an error object). A refusal that already wrote its own, more specific audit row
sets ``audited`` so the endpoint does not write a second one.
"""


class OAuthError(Exception):
    error = "invalid_request"
    status_code = 400

    def __init__(self, description: str = "", *, reason: str = "", audited: bool = False):
        super().__init__(description)
        self.description = description
        # Why, for the audit row, when it says more than the description the client sees.
        self.reason = reason or description
        self.audited = audited


class InvalidRequest(OAuthError):
    """RFC 6749 §5.2: a parameter is missing, malformed, repeated, or not allowed here."""

    error = "invalid_request"


class InvalidClient(OAuthError):
    """RFC 6749 §5.2: client authentication failed (unknown client, wrong credentials, suspended).

    HTTP 401 with a ``WWW-Authenticate`` challenge; the client learns no more than that.
    """

    error = "invalid_client"
    status_code = 401


class InvalidGrant(OAuthError):
    """RFC 6749 §5.2: the grant (code, refresh token, auth_req_id, subject token) is invalid,
    expired, revoked, used already, or was issued to another client."""

    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    """RFC 6749 §5.2: this client may not use this grant type (or this form of it)."""

    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    """RFC 6749 §5.2: the grant type is not one this server supports."""

    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    """RFC 6749 §5.2: the requested scope is invalid, unknown, or exceeds what was granted."""

    error = "invalid_scope"


class InvalidTarget(OAuthError):
    """RFC 8707 §2 / RFC 8693 §2.2.2: the requested or presented audience is not acceptable."""

    error = "invalid_target"


class InvalidDPoPProof(OAuthError):
    """RFC 9449 §7.1: the DPoP proof is missing where required, malformed, or invalid."""

    error = "invalid_dpop_proof"


class UseDPoPNonce(InvalidDPoPProof):
    """RFC 9449 §8: the proof must carry the server's current nonce (sent in ``DPoP-Nonce``)."""

    error = "use_dpop_nonce"


class ConfigurationError(OAuthError):
    """An admin asked for a configuration that cannot work."""


class AccessDenied(OAuthError):
    """RFC 6749 §4.1.2.1 / CIBA Core §11: the resource owner or server denied the request."""

    error = "access_denied"


class TooManyRequests(OAuthError):
    """RFC 6585 §4: 429 Too Many Requests, with ``Retry-After`` (RFC 9110 §10.2.3).

    OAuth defines no error code for a rate limit outside CIBA polling (where it is ``slow_down``,
    CIBA Core §11); ``temporarily_unavailable`` (RFC 6749 §4.1.2.1) says what the client should do:
    come back later. ``retry_after`` is in seconds.
    """

    error = "temporarily_unavailable"
    status_code = 429

    def __init__(self, description: str = "", *, retry_after: int = 1, error: str = "", **kwargs):
        super().__init__(description, **kwargs)
        self.retry_after = max(1, int(retry_after))
        if error:
            self.error = error

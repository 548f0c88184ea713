"""CIBA, RAR and redemption errors (rendered by ``consent.http.oauth_error``)."""

from consent.errors import AccessDenied, InvalidGrant, InvalidRequest, InvalidScope, InvalidTarget, OAuthError

__all__ = ["AccessDenied", "InvalidGrant", "InvalidRequest", "InvalidScope", "InvalidTarget"]


class BackchannelAccessDenied(AccessDenied):
    """CIBA Core §13: at the backchannel endpoint, ``access_denied`` is HTTP 403 Forbidden."""

    status_code = 403


class ExpiredLoginHintToken(OAuthError):
    """CIBA Core §13: the login_hint_token (the session access token) has expired."""

    error = "expired_login_hint_token"


class InvalidBindingMessage(OAuthError):
    """CIBA Core §13: the binding_message is invalid or unacceptable."""

    error = "invalid_binding_message"


class InvalidAuthorizationDetails(OAuthError):
    """RFC 9396 §5: authorization_details malformed, or of a type this scope does not accept."""

    error = "invalid_authorization_details"


class TooManyPending(OAuthError):
    """Approval-fatigue cap reached; try again once the user has answered."""

    error = "temporarily_unavailable"
    status_code = 429


class AuthorizationPending(OAuthError):
    """CIBA Core §11: the user has not answered yet."""

    error = "authorization_pending"


class SlowDown(OAuthError):
    """CIBA Core §11: polling faster than the interval; add 5 seconds to it."""

    error = "slow_down"


class ExpiredToken(OAuthError):
    """CIBA Core §11: the auth_req_id has expired; the client must make a new request."""

    error = "expired_token"



class InvalidToken(OAuthError):
    """The action token is not valid for redemption (bad, expired, already redeemed, or revoked)."""

    error = "invalid_token"



class ApprovalNotFound(Exception):
    """No approval with that id belongs to this user (rendered as 404)."""


class ApprovalNotPending(Exception):
    """The approval was already decided, expired, or cancelled."""

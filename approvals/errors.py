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
    code = "too_many_prompts"


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


# --- what exactly was refused (``reason``): CIBA Core §11 polls -----------------------------------


class UnknownAuthReqId(InvalidGrant):
    """CIBA Core §11: the ``auth_req_id`` is unknown, or belongs to another client."""

    code = "unknown_auth_req_id"


class AlreadyIssued(InvalidGrant):
    """CIBA Core §11: the action token for this ``auth_req_id`` was collected already (single use)."""

    code = "already_issued"


class DeniedByUser(AccessDenied):
    """CIBA Core §11: the user answered Deny."""

    code = "denied"


class RequestCancelled(AccessDenied):
    """The request was cancelled before it was collected: its grant ended, its agent was suspended,
    or the agent cancelled it."""

    code = "cancelled"


class WindowPassed(ExpiredToken):
    """CIBA Core §11: the approval window passed before the user answered."""

    code = "window_passed"


# --- redemption -----------------------------------------------------------------------------------


class UnknownActionToken(InvalidToken):
    """No action token with this ``jti`` was ever issued."""

    code = "unknown_action_token"


class AlreadyRedeemed(InvalidToken):
    """The action token was redeemed before: it is good for exactly one use."""

    code = "already_redeemed"


class ActionTokenExpired(InvalidToken):
    """The action token's short lifetime passed unredeemed."""

    code = "action_token_expired"


class ApprovalNotRedeemable(InvalidToken):
    """The approval behind the token is no longer ISSUED (cancelled, expired)."""

    code = "approval_not_issued"


class RedeemGrantInactive(InvalidToken):
    """The session grant the approval belongs to was revoked or has expired."""

    code = "grant_inactive"


class AgentSuspended(InvalidToken):
    """The agent the token names is suspended in the registry."""

    code = "agent_suspended"


class RedeemInstanceCutOff(InvalidToken):
    """The agent instance that asked for the action was cut off from the grant since
    (draft-ietf-oauth-attestation-based-client-auth: the instance no longer authenticates)."""

    code = "instance_cut_off"


class ActionHashMismatch(InvalidToken):
    """``action_hash`` is not the base64url SHA-256 of the JCS form (RFC 8785) of the token's ``authorization_details`` (RFC 9396)."""

    code = "action_hash_mismatch"


class ActionMismatch(InvalidRequest):
    """The action the resource server is about to execute is not the approved one."""

    code = "action_mismatch"



class ApprovalNotFound(Exception):
    """No approval with that id belongs to this user (rendered as 404)."""


class ApprovalNotPending(Exception):
    """The approval was already decided, expired, or cancelled."""

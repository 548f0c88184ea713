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


# --- votes on a request a quorum decides (approvals.votes) ----------------------------------------


class VoteRefused(AccessDenied):
    """RFC 6749 §4.1.2.1: the resource owner or authorization server denied the request: this person's
    vote on a request that needs a quorum is not accepted. Nothing is recorded but the refusal."""

    status_code = 403


class NotAnApprover(VoteRefused):
    """The person is not (or no longer) an active member of the policy's approver group."""

    code = "not_an_approver"


class AlreadyVoted(VoteRefused):
    """The person answered this request before: each approver counts once."""

    status_code = 409
    code = "already_voted"


class RequesterExcluded(VoteRefused):
    """The policy excludes the user the agent acts for: someone else must approve."""

    code = "requester_excluded"


class ApprovalNotFound(Exception):
    """No approval with that id belongs to this user (rendered as 404)."""


class ApprovalNotPending(Exception):
    """The approval was already decided, expired, or cancelled."""


# --- the delivery channels (approvals.notify) -------------------------------------------------------


class PushSubscriptionInvalid(InvalidRequest):
    """RFC 8291 §3, RFC 8030 §5: the subscription is malformed (endpoint not an https URL, keys not
    a P-256 point and a 16-octet secret), so nothing could be pushed to it."""

    code = "push_subscription_invalid"


class PushSubscriptionTooLarge(InvalidRequest):
    """The subscription is larger than ``PUSH_SUBSCRIPTION_MAX_BYTES``: refused before it is parsed."""

    status_code = 413
    code = "push_subscription_too_large"


class TooManyDevices(InvalidRequest):
    """The user has ``PUSH_MAX_DEVICES_PER_USER`` devices already; remove one first."""

    status_code = 409
    code = "too_many_devices"


class DeviceNotFound(InvalidRequest):
    """No such device among the signed-in user's own (another user's device id included)."""

    status_code = 404
    code = "device_not_found"

"""The protocol error hierarchy: each error carries its OAuth error code, HTTP status and description.

Rendered in one place, ``consent.http.oauth_error`` (and ``consent.http.error_response``
for an error object). A refusal that already wrote its own, more specific audit row
sets ``audited`` so the endpoint does not write a second one.
"""

from typing import Any


class OAuthError(Exception):
    """RFC 6749 §5.2: an error response, ``{"error", "error_description"}`` and our ``reason``."""

    error = "invalid_request"
    status_code = 400
    #: What exactly was refused, stable and machine-readable: the ``reason`` of the JSON body, so a
    #: client decides on it and never on the prose of ``error_description``. A class without one
    #: of its own answers with its ``error``.
    code = ""
    #: The ``WWW-Authenticate`` scheme a 401 challenges with: client authentication (RFC 6749 §2.3.1)
    #: unless the refusal is of a bearer token (RFC 6750 §3).
    scheme = "Basic"

    def __init__(self, description: str = "", *, reason: str = "", audited: bool = False):
        super().__init__(description)
        self.description = description
        # Why, for the audit row, when it says more than the description the client sees.
        self.reason = reason or description
        self.audited = audited

    @property
    def reason_code(self) -> str:
        return self.code or self.error


class InvalidRequest(OAuthError):
    """RFC 6749 §5.2: a parameter is missing, malformed, repeated, or not allowed here."""

    error = "invalid_request"


class InvalidClient(OAuthError):
    """RFC 6749 §5.2: client authentication failed (unknown client, wrong credentials, suspended).

    HTTP 401 with a ``WWW-Authenticate`` challenge; the client learns no more than that.
    """

    error = "invalid_client"
    status_code = 401
    code = "client_authentication_failed"  # one code for every cause: it tells no one which clients exist


class InvalidGrant(OAuthError):
    """RFC 6749 §5.2: the grant (code, refresh token, auth_req_id, subject token) is invalid,
    expired, revoked, used already, or was issued to another client."""

    error = "invalid_grant"


class UnknownGrant(InvalidGrant):
    """The code, refresh token or subject is unknown, or was issued to another client (§5.2)."""

    code = "unknown_grant"


class CodeExpired(InvalidGrant):
    """RFC 6749 §4.1.2: the authorization code's short lifetime has passed."""

    code = "code_expired"


class CodeReused(InvalidGrant):
    """RFC 6749 §4.1.2: the code was used before; the grant it came from is revoked."""

    code = "code_reused"


class PkceMismatch(InvalidGrant):
    """RFC 7636 §4.6: the code verifier does not hash to the code challenge."""

    code = "pkce_mismatch"


class RedirectUriMismatch(InvalidGrant):
    """RFC 6749 §4.1.3: ``redirect_uri`` differs from the authorization request's."""

    code = "redirect_uri_mismatch"


class GrantInactive(InvalidGrant):
    """The session grant behind the credential was revoked or has expired."""

    code = "grant_inactive"


class RefreshNotAllowed(InvalidGrant):
    """The agent's refresh mode issues no refresh tokens (``exchange`` or ``none``)."""

    code = "refresh_not_allowed"


class RefreshReused(InvalidGrant):
    """RFC 9700 §4.14.2: a rotated refresh token came back; the grant is revoked."""

    code = "refresh_token_reused"


class ConcurrentUse(InvalidGrant):
    """Another request spent the same single-use credential at the same moment."""

    code = "concurrent_use"


class SubjectTokenInvalid(InvalidGrant):
    """RFC 8693 §2.2.2: the ``subject_token`` is not a live session token of this agent."""

    code = "subject_token_invalid"


class ActorTokenInvalid(InvalidGrant):
    """RFC 8693 §2.2.2: the ``actor_token`` names no active registered agent, or fails to verify."""

    code = "actor_token_invalid"


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

    def __init__(self, description: str = "", *, retry_after: int = 1, error: str = "", **kwargs: Any):
        super().__init__(description, **kwargs)
        self.retry_after = max(1, int(retry_after))
        if error:
            self.error = error


class ServiceUnavailable(OAuthError):
    """RFC 6749 §4.1.2.1 ``temporarily_unavailable``, as HTTP 503: a dependency (the database) is down.

    Nothing was written (every write is in a transaction); ``Retry-After`` says when to come back.
    """

    error = "temporarily_unavailable"
    status_code = 503
    code = "service_unavailable"


class NotFound(OAuthError):
    """RFC 9110 §15.5.5: what the request names does not exist (for this caller)."""

    error = "not_found"
    status_code = 404


class MethodNotAllowed(InvalidRequest):
    """RFC 9110 §15.5.6: the endpoint answers other methods only (its ``Allow`` header says which)."""

    status_code = 405


# --- budgets (consent.budget): what a user may set on a step-up scope, within the admin's maximum ---


class BudgetRefused(InvalidRequest):
    """A budget the user asked for cannot be set (RFC 6749 §5.2 ``invalid_request``): the form's
    values are outside what the scope policy offers. Nothing is changed."""

    code = "budget_invalid"


class BudgetExceeded(BudgetRefused):
    """The ceiling or the period total is above the administrator's maximum for the scope."""

    code = "budget_exceeded"


class BudgetCurrency(BudgetRefused):
    """The budget is in another currency than the scope policy's."""

    code = "budget_currency"


class BudgetNotOffered(BudgetRefused):
    """The scope offers no budget (its policy sets no maximum), or is not in this grant."""

    code = "budget_not_offered"


class BudgetNotLowered(BudgetRefused):
    """A change to a budget may only lower it; raising it needs a new consent."""

    code = "budget_not_lowered"


class BudgetNotFound(OAuthError):
    """No active budget of this user's with that id (HTTP 404: another user's budget is not theirs
    to see)."""

    error = "not_found"
    status_code = 404
    code = "budget_not_found"


class InstanceCutOff(InvalidClient):
    """draft-ietf-oauth-attestation-based-client-auth §5: this instance of the agent proved its key,
    but the user or an administrator cut it off from the session grant (``agent_instance_cut_off``).
    The grant and the agent's other instances keep working."""

    code = "instance_cut_off"


class InstanceMismatch(InvalidGrant):
    """RFC 6749 §5.2 ("issued to another client"), per instance: the refresh token, ``auth_req_id``
    or token presented belongs to another instance of the agent (or to the agent as one)."""

    code = "instance_mismatch"

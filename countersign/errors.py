"""Typed errors of the Countersign client package.

Two families:

- :class:`CountersignError` — why a resource server refuses a request. Each
  carries the RFC 6750 §3.1 ``error`` code (or RFC 9449 §7.1
  ``invalid_dpop_proof``), a human ``description``, the HTTP ``status_code``
  to answer with, and renders its own ``WWW-Authenticate`` challenge
  (RFC 6750 §3, RFC 9449 §7.1).
- :class:`AgentError` — why an agent's call to the authorization server did not
  produce a token (RFC 6749 §5.2, OpenID CIBA Core §11, §13).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "ActionMismatch",
    "AgentError",
    "AgentNotAllowed",
    "AlreadyRedeemed",
    "ApprovalDenied",
    "ApprovalError",
    "ApprovalExpired",
    "ApprovalTimeout",
    "CountersignError",
    "ExpiredToken",
    "GrantRevoked",
    "InsufficientScope",
    "InvalidDPoPProof",
    "InvalidRequest",
    "InstanceCutOff",
    "InvalidToken",
    "MissingToken",
    "OAuthError",
    "ServiceUnavailable",
    "SessionEnded",
]

REALM = "countersign"


def _quoted(value: str) -> str:
    """An RFC 7235 §2.1 quoted-string without the characters RFC 6750 §3 forbids in attribute values."""
    cleaned = "".join(ch for ch in value if ch >= " " and ch not in '"\\\x7f')
    return f'"{cleaned}"'


class CountersignError(Exception):
    """Base of every refusal a resource server makes on a Countersign token."""

    error: ClassVar[str] = "invalid_token"
    status_code: ClassVar[int] = 401
    #: RFC 6750 §3.1: a request without any credentials gets a challenge with no error code.
    challenge_error: ClassVar[bool] = True

    def __init__(
        self,
        description: str = "",
        *,
        dpop: bool = False,
        scope: Sequence[str] = (),
        dpop_algs: Sequence[str] = (),
    ) -> None:
        super().__init__(description or self.error)
        self.description = description
        #: True when the token is DPoP-bound (or was presented with the DPoP scheme): the
        #: challenge then uses the ``DPoP`` scheme (RFC 9449 §7.1).
        self.dpop = dpop
        #: RFC 6750 §3: the scopes that would have been enough (insufficient_scope).
        self.scope = tuple(scope)
        #: RFC 9449 §7.1: ``algs`` attribute of a DPoP challenge.
        self.dpop_algs = tuple(dpop_algs)

    @property
    def scheme(self) -> str:
        return "DPoP" if self.dpop else "Bearer"

    def www_authenticate(self, resource_metadata: str | None = None) -> str:
        """The ``WWW-Authenticate`` header value (RFC 6750 §3, RFC 9449 §7.1), naming the
        resource's metadata URL when given (RFC 9728 §5.1).

        >>> InvalidToken("token expired").www_authenticate()
        'Bearer realm="countersign", error="invalid_token", error_description="token expired"'
        """
        parts = [f"realm={_quoted(REALM)}"]
        if self.challenge_error:
            parts.append(f"error={_quoted(self.error)}")
            if self.description:
                parts.append(f"error_description={_quoted(self.description)}")
            if self.scope:
                parts.append(f"scope={_quoted(' '.join(self.scope))}")
        if self.dpop and self.dpop_algs:
            parts.append(f"algs={_quoted(' '.join(self.dpop_algs))}")
        if resource_metadata:
            parts.append(f"resource_metadata={_quoted(resource_metadata)}")
        return f"{self.scheme} " + ", ".join(parts)

    def as_dict(self) -> dict[str, str]:
        """A JSON body for the refusal (RFC 6749 §5.2 member names).

        Like the challenge, it names no error when the request carried no credentials
        at all (RFC 6750 §3.1).
        """
        body = {"error": self.error} if self.challenge_error else {}
        if self.description:
            body["error_description"] = self.description
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


class InvalidRequest(CountersignError):
    """RFC 6750 §3.1 ``invalid_request``: malformed credentials, e.g. two ways of sending a token."""

    error = "invalid_request"
    status_code = 400


class MissingToken(CountersignError):
    """RFC 6750 §3.1: the request carries no access token; the challenge names no error."""

    challenge_error = False


class InvalidToken(CountersignError):
    """RFC 6750 §3.1 ``invalid_token``: expired, revoked, malformed, or not for us."""


class ExpiredToken(InvalidToken):
    """RFC 6750 §3.1 ``invalid_token``: the token's ``exp`` has passed (RFC 7519 §4.1.4)."""


class AgentNotAllowed(InvalidToken):
    """The acting agent (``act.sub``, RFC 8693 §4.1) is unknown to the registry or suspended."""


class InstanceCutOff(AgentNotAllowed):
    """The acting instance of the agent (``act.instance``) was cut off from the grant, or is unknown
    to the registry (draft-ietf-oauth-attestation-based-client-auth: it no longer authenticates)."""


class InvalidDPoPProof(InvalidToken):
    """RFC 9449 §7.1 ``invalid_dpop_proof``: the DPoP proof is missing or fails a §4.3 check."""

    error = "invalid_dpop_proof"


class AlreadyRedeemed(InvalidToken):
    """The one-shot action token was already redeemed (its side effect must not happen twice)."""


class InsufficientScope(CountersignError):
    """RFC 6750 §3.1 ``insufficient_scope``: valid token, but not for this operation."""

    error = "insufficient_scope"
    status_code = 403


class ActionMismatch(InsufficientScope):
    """The action token approves another action: its RFC 9396 ``authorization_details``
    hash differs from the request about to be executed."""


class ServiceUnavailable(CountersignError):
    """The authorization server (metadata, JWKS, agent registry, redemption) could not be
    consulted. The verifier fails closed; answer 503 so clients retry rather than re-authenticate."""

    error = "temporarily_unavailable"
    status_code = 503


# --- the agent's side ------------------------------------------------------------------------


class AgentError(Exception):
    """Base of every failure an :class:`~countersign.agent.AgentClient` call raises."""

    def __init__(self, error: str, description: str = "", *, status_code: int = 0) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status_code = status_code


class OAuthError(AgentError):
    """An error response from the authorization server (RFC 6749 §5.2) with no more specific class."""


class SessionEnded(AgentError):
    """No usable session token and no way to mint one: the user must consent again.

    Raised when the refresh token or token exchange is refused (RFC 6749 §5.2
    ``invalid_grant``) or when the agent has neither a refresh token nor a key.
    """


class ApprovalError(AgentError):
    """A step-up approval (OpenID CIBA Core 1.0) did not produce an action token."""

    def __init__(
        self, error: str, description: str = "", *, status_code: int = 0, auth_req_id: str | None = None
    ) -> None:
        super().__init__(error, description, status_code=status_code)
        self.auth_req_id = auth_req_id


class ApprovalDenied(ApprovalError):
    """CIBA Core §11 ``access_denied``: the user said no."""


class ApprovalExpired(ApprovalError):
    """CIBA Core §11 ``expired_token``: the approval window passed without an answer."""


class ApprovalTimeout(ApprovalError):
    """The caller's own ``timeout`` passed first; the request may still be answered later."""


class GrantRevoked(ApprovalError):
    """The session grant behind the request is revoked or ended, or the agent is suspended
    (CIBA Core §13 ``access_denied`` at request time, ``invalid_grant``, or a cancelled request)."""

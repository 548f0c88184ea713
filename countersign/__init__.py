"""Countersign client package: the agent SDK and the resource-server verifier.

Plain Python (httpx, PyJWT, rfc8785); only :mod:`countersign.django` imports Django.

- :class:`TokenVerifier` — verify session tokens (RFC 9068) and one-shot action
  tokens, check the acting agent (RFC 8693 ``act``) against the registry, DPoP
  (RFC 9449), and redeem action tokens.
- :func:`verify_checkpoint`, :func:`verify_inclusion_bundle`, :func:`verify_consistency_bundle`
  — check the server's signed audit ledger offline with only its JWKS (RFC 9162 §2.1 Merkle
  proofs against signed checkpoints; :mod:`countersign.ledger`, :mod:`countersign.rfc9162`).
- :class:`AgentClient` / :class:`AsyncAgentClient` — authorization code + PKCE
  (RFC 6749, RFC 7636), token upkeep (refresh, RFC 8693 exchange with RFC 7523
  ``private_key_jwt``), step-up approvals (OpenID CIBA Core 1.0, RFC 9396).
"""

from .agent import ActionToken, AgentClient, AsyncAgentClient, TokenSet
from .dpop import DPoPKey, DPoPProof, ReplayCache, access_token_hash, jwk_thumbprint, verify_proof
from .errors import (
    ActionMismatch,
    AgentError,
    AgentNotAllowed,
    AlreadyRedeemed,
    ApprovalDenied,
    ApprovalError,
    ApprovalExpired,
    ApprovalTimeout,
    CountersignError,
    ExpiredToken,
    GrantRevoked,
    InstanceCutOff,
    InsufficientScope,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    OAuthError,
    ServiceUnavailable,
    SessionEnded,
)
from .instance import AgentInstance
from .ledger import (
    Checkpoint,
    LedgerError,
    verify_checkpoint,
    verify_consistency_bundle,
    verify_inclusion_bundle,
)
from .receipts import InvalidReceipt, verify_receipt
from .usage import UsageReporter
from .verifier import AgentRecord, TokenVerifier, VerifiedToken, action_hash, parse_authorization

__all__ = [
    "ActionMismatch",
    "ActionToken",
    "AgentClient",
    "AgentError",
    "AgentInstance",
    "AgentNotAllowed",
    "AgentRecord",
    "AlreadyRedeemed",
    "ApprovalDenied",
    "ApprovalError",
    "ApprovalExpired",
    "ApprovalTimeout",
    "Checkpoint",
    "AsyncAgentClient",
    "CountersignError",
    "DPoPKey",
    "DPoPProof",
    "ExpiredToken",
    "GrantRevoked",
    "InstanceCutOff",
    "InsufficientScope",
    "InvalidDPoPProof",
    "InvalidReceipt",
    "InvalidRequest",
    "InvalidToken",
    "LedgerError",
    "MissingToken",
    "OAuthError",
    "ReplayCache",
    "ServiceUnavailable",
    "SessionEnded",
    "TokenSet",
    "TokenVerifier",
    "UsageReporter",
    "VerifiedToken",
    "access_token_hash",
    "action_hash",
    "jwk_thumbprint",
    "parse_authorization",
    "verify_checkpoint",
    "verify_consistency_bundle",
    "verify_inclusion_bundle",
    "verify_proof",
    "verify_receipt",
]

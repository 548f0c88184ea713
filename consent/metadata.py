"""Authorization server metadata (RFC 8414 §2), served at both well-known paths.

Lists exactly what is implemented; later capabilities add themselves here.
"""

from typing import Any

from .conf import countersign_settings
from .keys import SUPPORTED_ALGS
from .models import ScopePolicy
from .oauth.dpop import ALLOWED_ALGS as DPOP_ALGS
from .oauth.private_key_jwt import ALLOWED_ALGS as ASSERTION_ALGS


def _authorization_details_types() -> list[str]:
    types: set[str] = set()
    for accepted in ScopePolicy.objects.filter(sensitivity=ScopePolicy.Sensitivity.STEP_UP).values_list(
        "authorization_details_types", flat=True
    ):
        types.update(accepted or [])
    return sorted(types)


def server_metadata() -> dict[str, Any]:
    issuer = countersign_settings.ISSUER
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/o/authorize/",
        "token_endpoint": f"{issuer}/o/token/",
        "introspection_endpoint": f"{issuer}/o/introspect/",
        "usage_endpoint": f"{issuer}/o/usage/",
        "revocation_endpoint": f"{issuer}/o/revoke/",
        "backchannel_authentication_endpoint": f"{issuer}/o/bc-authorize/",
        "backchannel_token_delivery_modes_supported": ["poll", "ping"],
        "backchannel_user_code_parameter_supported": False,
        "redemption_endpoint": f"{issuer}/o/redeem/",
        # A resource server opens a step-up for a token it was handed, and collects it (approvals.rs_stepup).
        "resource_server_approval_endpoint": f"{issuer}/o/rs-approvals/",
        "resource_server_approval_token_endpoint": f"{issuer}/o/rs-approvals/token/",
        "agent_registry_endpoint": f"{issuer}/o/agents/",
        "agent_registry_document": f"{issuer}/.well-known/agent-registry.jwt",
        # The audit ledger's signed checkpoints (docs/audit.md), like a CT log's signed tree heads.
        "audit_checkpoints_endpoint": f"{issuer}/audit/checkpoints/",
        "dpop_signing_alg_values_supported": list(DPOP_ALGS),
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "scopes_supported": list(ScopePolicy.objects.order_by("name").values_list("name", flat=True)),
        "authorization_details_types_supported": _authorization_details_types(),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "authorization_response_iss_parameter_supported": True,
        "grant_types_supported": list(countersign_settings.TOKEN_GRANTS),
        "code_challenge_methods_supported": ["S256"],
        # "none": public clients (self-described agents that registered so); PKCE binds their codes.
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
            "attest_jwt_client_auth",
            "none",
        ],
        # draft-ietf-oauth-attestation-based-client-auth §10.1: agent instances (consent.instances)
        "client_attestation_signing_alg_values_supported": list(ASSERTION_ALGS),
        "client_attestation_pop_signing_alg_values_supported": list(ASSERTION_ALGS),
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
            "none",
        ],
        "access_token_signing_alg_values_supported": list(SUPPORTED_ALGS),
        "subject_types_supported": ["public"],
        "claims_supported": [
            "iss",
            "sub",
            "aud",
            "exp",
            "iat",
            "jti",
            "scope",
            "client_id",
            "act",
            "grant_id",
            "auth_time",
            "acr",
            "amr",
            "cnf",
            "authorization_details",
            "action_hash",
            "approval_id",
        ],
        **_self_described_metadata(issuer),
    }


def _self_described_metadata(issuer: str) -> dict[str, Any]:
    """Agents that were never registered: RFC 7591 §3 registration (unless the policy is off) and
    Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document §5)."""
    extra: dict[str, Any] = {}
    if countersign_settings.CLIENT_REGISTRATION != "off":
        extra["registration_endpoint"] = f"{issuer}/o/register/"
    if countersign_settings.CLIENT_ID_METADATA_DOCUMENTS:
        extra["client_id_metadata_document_supported"] = True
    return extra

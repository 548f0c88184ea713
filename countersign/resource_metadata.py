"""OAuth 2.0 Protected Resource Metadata (RFC 9728), from a verifier's configuration.

https://www.rfc-editor.org/rfc/rfc9728

- §3.1: the metadata of the resource ``https://api.example/mcp`` is at
  ``https://api.example/.well-known/oauth-protected-resource/mcp`` (the well-known
  segment goes between the host and the path); a resource without a path has it
  at ``/.well-known/oauth-protected-resource``. Integrations serve both forms, as
  MCP clients try the path-suffixed one first and the root one next.
- §2: ``resource`` (the audience tokens must carry), ``authorization_servers``
  (the issuer), ``scopes_supported``, ``bearer_methods_supported`` (the
  ``Authorization`` header only, RFC 6750 §2.1), ``dpop_signing_alg_values_supported``.
- §5.1: every ``WWW-Authenticate`` challenge names the metadata URL in
  ``resource_metadata`` (:meth:`countersign.errors.CountersignError.www_authenticate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

__all__ = ["WELL_KNOWN", "metadata_document", "metadata_paths", "metadata_url"]

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_url(resource: str) -> str:
    """§3.1: where the metadata of ``resource`` is published."""
    parts = urlsplit(resource)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{path}"


def metadata_paths(resource: str) -> tuple[str, ...]:
    """The request paths that serve the metadata: the §3.1 path-suffixed form, and the root form."""
    suffixed = urlsplit(metadata_url(resource)).path
    return (suffixed,) if suffixed == WELL_KNOWN else (suffixed, WELL_KNOWN)


def metadata_document(
    *,
    resource: str,
    issuer: str,
    scopes_supported: Sequence[str] = (),
    resource_name: str | None = None,
    dpop_algorithms: Sequence[str] = (),
) -> dict[str, Any]:
    """The §2 metadata: only what the resource server does (header bearer or DPoP tokens from ``issuer``)."""
    document: dict[str, Any] = {
        "resource": resource,
        "authorization_servers": [issuer],
        "bearer_methods_supported": ["header"],
    }
    if scopes_supported:
        document["scopes_supported"] = list(scopes_supported)
    if resource_name:
        document["resource_name"] = resource_name
    if dpop_algorithms:
        document["dpop_signing_alg_values_supported"] = list(dpop_algorithms)
    return document

"""Running one agent as many instances: OAuth 2.0 Attestation-Based Client Authentication.

https://datatracker.ietf.org/doc/draft-ietf-oauth-attestation-based-client-auth/

Each instance has a key of its own (:class:`AgentInstance`). The agent's registered key (the one in
its JWKS, which its backend holds) vouches for it with a Client Attestation (§5.1): ``iss`` =
``sub`` = the client id, ``cnf.jwk`` = the instance's public key, an ``instance`` claim, a short
``exp``. On every request to the authorization server the instance sends it with a fresh
Client Attestation PoP (§5.2) it signs itself, in the ``OAuth-Client-Attestation`` and
``OAuth-Client-Attestation-PoP`` headers (§6.1). Tokens it gets name it:
``act: {"sub": "agent:<client_id>", "instance": "<id>"}``.

A process that holds the agent key attests its own instances (:meth:`AgentInstance.generate`);
otherwise the agent's backend signs with :func:`issue_attestation` and hands the instance the
attestation (:meth:`AgentInstance.with_attestation`), so the agent key never leaves it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt

from .dpop import DPoPKey, PrivateKey, default_alg

__all__ = ["ATTESTATION_HEADER", "POP_HEADER", "AgentInstance", "issue_attestation"]

ATTESTATION_HEADER = "OAuth-Client-Attestation"
POP_HEADER = "OAuth-Client-Attestation-PoP"
ATTESTATION_TYP = "oauth-client-attestation+jwt"
POP_TYP = "oauth-client-attestation-pop+jwt"
DEFAULT_LIFETIME = 3600  # the server's CLIENT_ATTESTATION_MAX_LIFETIME default

Attester = Callable[[dict[str, str], str], str]  # (instance public jwk, instance id) -> attestation


def issue_attestation(
    *,
    client_id: str,
    agent_key: PrivateKey,
    instance_jwk: dict[str, str],
    instance: str,
    key_id: str | None = None,
    lifetime: int = DEFAULT_LIFETIME,
) -> str:
    """A Client Attestation (§5.1) signed by the agent's registered key for one instance's key."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "iat": now,
        "exp": now + lifetime,
        "cnf": {"jwk": instance_jwk},
        "instance": instance,
    }
    headers: dict[str, Any] = {"typ": ATTESTATION_TYP, **({"kid": key_id} if key_id else {})}
    return jwt.encode(claims, agent_key, algorithm=default_alg(agent_key), headers=headers)


class AgentInstance:
    """One running instance: its id, its key (also usable as its DPoP key), and its attestation.

    ``attester`` is called for a new attestation when the current one is about to expire.
    """

    def __init__(
        self,
        client_id: str,
        *,
        key: DPoPKey,
        instance: str,
        attester: Attester,
        lifetime: int = DEFAULT_LIFETIME,
    ) -> None:
        self.client_id = client_id
        self.key = key
        self.instance = instance
        self._attester = attester
        self._lifetime = lifetime
        self._attestation: tuple[float, str] | None = None
        self._lock = threading.Lock()

    @classmethod
    def generate(
        cls,
        client_id: str,
        *,
        agent_key: PrivateKey,
        key_id: str | None = None,
        instance: str | None = None,
        lifetime: int = DEFAULT_LIFETIME,
    ) -> AgentInstance:
        """A new instance with a fresh P-256 key, attested by ``agent_key`` (the registered key)."""
        key = DPoPKey.generate()
        return cls(
            client_id,
            key=key,
            instance=instance or secrets.token_hex(8),
            lifetime=lifetime,
            attester=lambda jwk, inst: issue_attestation(
                client_id=client_id,
                agent_key=agent_key,
                instance_jwk=jwk,
                instance=inst,
                key_id=key_id,
                lifetime=lifetime,
            ),
        )

    @classmethod
    def with_attestation(
        cls, client_id: str, *, key: DPoPKey, instance: str, attestation: str
    ) -> AgentInstance:
        """An instance whose attestation the agent's backend signed (no agent key in this process)."""
        return cls(client_id, key=key, instance=instance, attester=lambda jwk, inst: attestation)

    def attestation(self) -> str:
        with self._lock:
            if self._attestation is None or self._attestation[0] <= time.monotonic():
                self._attestation = (
                    time.monotonic() + self._lifetime * 0.8,
                    self._attester(self.key.jwk, self.instance),
                )
            return self._attestation[1]

    def pop(self, audience: str, *, jti: str | None = None, iat: int | None = None) -> str:
        """A Client Attestation PoP (§5.2): signed by the instance key, for ``audience``, fresh ``jti``."""
        claims = {
            "iss": self.client_id,
            "aud": audience,
            "jti": jti or secrets.token_urlsafe(16),
            "iat": int(time.time()) if iat is None else iat,
            "instance": self.instance,
        }
        return jwt.encode(claims, self.key.private_key, algorithm=self.key.alg, headers={"typ": POP_TYP})

    def headers(self, audience: str) -> dict[str, str]:
        """The two headers that authenticate this instance on one request (§6.1)."""
        return {ATTESTATION_HEADER: self.attestation(), POP_HEADER: self.pop(audience)}

"""Who signs the ledger's checkpoints: handed to ``audit`` at start-up, never imported by it.

The signing keys belong to the authorization server (``consent.keys``: rotation, the JWKS, the
issuer). ``audit`` depends on no other app of ours, so the app that owns the keys registers a
``LedgerSigner`` in its ``AppConfig.ready`` (``consent.keys.ServerSigner``), and the sealer,
``audit_verify`` and the checkpoint endpoints ask ``ledger_signer()`` for it.
"""

from typing import Any, Protocol


class SigningKey(Protocol):
    """A private key with the ``kid`` and JWS ``alg`` it signs under (RFC 7515 §4.1.1, §4.1.4)."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str: ...

    @property
    def private_key(self) -> Any: ...


class LedgerSigner(Protocol):
    def issuer(self) -> str:
        """The ``iss`` of every checkpoint: the server's issuer identifier (RFC 8414 §2)."""
        ...

    def active_key(self) -> SigningKey:
        """The key new checkpoints are signed with (made first if there is none)."""
        ...

    def jwks(self) -> dict[str, Any]:
        """Every public key ever signed with, retired ones included: old checkpoints stay checkable."""
        ...


_signer: LedgerSigner | None = None


def register_ledger_signer(signer: LedgerSigner) -> None:
    global _signer
    _signer = signer


def ledger_signer() -> LedgerSigner:
    if _signer is None:
        raise RuntimeError(
            "no ledger signer registered: the app that owns the signing keys registers one at start-up"
        )
    return _signer

"""Salted SHA-256 for server-generated client secrets: the same work per check as Countersign's."""

import hashlib
import secrets
from typing import TYPE_CHECKING, Any

from django.contrib.auth.hashers import BasePasswordHasher
from django.utils.crypto import constant_time_compare

if TYPE_CHECKING:
    from django.utils.functional import _StrPromise


class SaltedSHA256Hasher(BasePasswordHasher):
    algorithm = "peer_sha256"

    def salt(self) -> str:
        return secrets.token_hex(8)

    def encode(self, password: str, salt: str) -> str:
        return f"{self.algorithm}${salt}${hashlib.sha256(f'{salt}${password}'.encode()).hexdigest()}"

    def decode(self, encoded: str) -> dict[str, Any]:
        algorithm, salt, digest = encoded.split("$", 2)
        return {"algorithm": algorithm, "salt": salt, "hash": digest}

    def verify(self, password: str, encoded: str) -> bool:
        return constant_time_compare(encoded, self.encode(password, self.decode(encoded)["salt"]))

    def safe_summary(self, encoded: str) -> "dict[str | _StrPromise, Any]":
        return {"algorithm": self.algorithm}

    def harden_runtime(self, password: str, encoded: str) -> None:
        pass

    def must_update(self, encoded: str) -> bool:
        return False

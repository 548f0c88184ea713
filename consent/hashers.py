"""A fast hasher for server-generated client secrets.

Client and resource-server secrets are 256-bit random strings made by the server,
so there is nothing to brute-force: an iterated password hash (PBKDF2 at a million
rounds, ~230 ms) would only cap the token endpoint at a few requests per second.
A salted SHA-256 keeps the stored form useless to a reader of the database.
"""

import hashlib
import secrets
from typing import TYPE_CHECKING, Any

from django.contrib.auth.hashers import BasePasswordHasher, mask_hash
from django.utils.crypto import constant_time_compare

if TYPE_CHECKING:
    from django.utils.functional import _StrPromise


class ClientSecretHasher(BasePasswordHasher):
    algorithm = "cs_sha256"

    def salt(self) -> str:
        return secrets.token_hex(8)

    def encode(self, password: str, salt: str) -> str:
        digest = hashlib.sha256(f"{salt}${password}".encode()).hexdigest()
        return f"{self.algorithm}${salt}${digest}"

    def decode(self, encoded: str) -> dict[str, str]:
        algorithm, salt, digest = encoded.split("$", 2)
        return {"algorithm": algorithm, "salt": salt, "hash": digest}

    def verify(self, password: str, encoded: str) -> bool:
        decoded = self.decode(encoded)
        return constant_time_compare(encoded, self.encode(password, decoded["salt"]))

    def safe_summary(self, encoded: str) -> "dict[str | _StrPromise, Any]":
        decoded = self.decode(encoded)
        return {
            "algorithm": decoded["algorithm"],
            "salt": mask_hash(decoded["salt"]),
            "hash": mask_hash(decoded["hash"]),
        }

    def harden_runtime(self, password: str, encoded: str) -> None:
        pass

    def must_update(self, encoded: str) -> bool:
        return False


def generate_secret() -> str:
    return secrets.token_urlsafe(32)

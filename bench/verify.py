#!/usr/bin/env python
"""Resource-server verification throughput: ``countersign.TokenVerifier`` vs bare ``jwt.decode``.

Measures, in one run and interleaved round by round (so machine noise hits both
sides alike):

1. bare ``jwt.decode`` of a session token with the public key already loaded and
   the same claim checks (``iss``, ``aud``, required claims, leeway);
2. ``TokenVerifier.verify_session`` on the same token: header and ``typ``
   checks, ``kid`` lookup in the cached JWKS, the same decode, actor chain,
   scopes, and the agent-registry lookup (cached);
3. the DPoP-bound path: bare = two ``jwt.decode`` calls (token, and proof with
   its key loaded); verifier = ``verify_session`` with the proof, i.e. the full
   RFC 9449 §4.3 check including ``ath``, thumbprint, replay cache.

for ES256 and RS256. Keys and tokens are made locally; the JWKS, metadata and
registry are served by an ``httpx.MockTransport`` and fetched once before timing,
so no network is measured. Each figure is the best of ``--rounds`` rounds.

Usage (from the project root)::

    .venv/bin/python bench/verify.py
    .venv/bin/python bench/verify.py --n 5000 --rounds 9

Nothing is asserted; the last line is one ``key=value`` line for comparing runs.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from countersign import DPoPKey, TokenVerifier  # noqa: E402
from countersign.dpop import jwk_thumbprint  # noqa: E402

ISSUER = "https://auth.example"
AUDIENCE = "https://catalog.example"
AGENT = "agent-bench"
HTU = "https://catalog.example/items"
REQUIRED = ["iss", "sub", "aud", "exp", "iat", "jti"]


class Issuer:
    def __init__(self, alg: str, dpop: DPoPKey) -> None:
        if alg == "ES256":
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            public = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            public = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.alg = alg
        self.public_key = self.private.public_key()
        self.kid = jwk_thumbprint(public)
        self.jwk = {**public, "kid": self.kid, "alg": alg, "use": "sig"}
        self.agent = {
            "client_id": AGENT,
            "actor": f"agent:{AGENT}",
            "name": "Bench",
            "publisher": "Bench",
            "status": "active",
            "jkt": [dpop.jkt],
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/.well-known/oauth-authorization-server":
            return httpx.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "jwks_uri": f"{ISSUER}/jwks",
                    "agent_registry_endpoint": f"{ISSUER}/o/agents/",
                },
            )
        if path == "/jwks":
            return httpx.Response(200, json={"keys": [self.jwk]})
        if path == f"/o/agents/{AGENT}":
            return httpx.Response(200, json=self.agent)
        return httpx.Response(404)

    def token(self, **extra: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "user:1",
            "aud": [AUDIENCE],
            "client_id": AGENT,
            "scope": "catalog:read budget:read",
            "act": {"sub": f"agent:{AGENT}"},
            "grant_id": "g",
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + 3600,
            **extra,
        }
        return jwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": self.kid, "typ": "at+jwt"}
        )


def best_per_op(fn: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def measure(
    pairs: list[tuple[str, Callable[[int], Callable[[], object]]]], n: int, rounds: int
) -> dict[str, float]:
    """Best seconds per operation of each named case; the cases alternate within each round."""
    best = {name: float("inf") for name, _ in pairs}
    for r in range(rounds):
        for name, make in pairs if r % 2 == 0 else list(reversed(pairs)):
            best[name] = min(best[name], best_per_op(make(r), n))
    return best


def run(alg: str, n: int, rounds: int) -> dict[str, float]:
    dpop = DPoPKey.generate()
    issuer = Issuer(alg, dpop)
    verifier = TokenVerifier(
        ISSUER,
        client_id="rs",
        client_secret="rs-secret",
        audience=AUDIENCE,
        http=httpx.Client(transport=httpx.MockTransport(issuer.handler)),
    )
    token = issuer.token()
    bound = issuer.token(cnf={"jkt": dpop.jkt})
    verifier.verify_session(token)  # metadata, JWKS and the registry entry are fetched here, once
    key, dpop_public = issuer.public_key, dpop.private_key.public_key()

    def bare() -> object:
        return jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=10,
            options={"require": REQUIRED},
        )

    def ours() -> object:
        return verifier.verify_session(token, required_scopes=("catalog:read",))

    # Every proof is used once (the replay cache refuses a second use), so each side gets its own,
    # made before the clock starts.
    def proofs() -> list[list[str]]:
        return [[dpop.proof("GET", HTU, access_token=bound) for _ in range(n)] for _ in range(rounds)]

    bare_proofs, our_proofs = proofs(), proofs()

    def bare_dpop(r: int) -> Callable[[], object]:
        it = iter(bare_proofs[r])

        def once() -> object:
            jwt.decode(
                bound,
                key,
                algorithms=[alg],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=10,
                options={"require": REQUIRED},
            )
            return jwt.decode(next(it), dpop_public, algorithms=["ES256"], options={"verify_aud": False})

        return once

    def ours_dpop(r: int) -> Callable[[], object]:
        it = iter(our_proofs[r])
        return lambda: verifier.verify_session(bound, dpop_proof=next(it), htm="GET", htu=HTU, scheme="DPoP")

    result = measure([("bare", lambda r: bare), ("verifier", lambda r: ours)], n, rounds)
    dpop_result = measure([("bare", bare_dpop), ("verifier", ours_dpop)], n, rounds)
    result.update({f"dpop_{k}": v for k, v in dpop_result.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="operations per round and case")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    summary = []
    for alg in ("ES256", "RS256"):
        r = run(alg, args.n, args.rounds)
        for path, bare_key, ours_key in [
            ("session", "bare", "verifier"),
            ("dpop", "dpop_bare", "dpop_verifier"),
        ]:
            bare_rate, ours_rate = 1 / r[bare_key], 1 / r[ours_key]
            ratio = bare_rate and ours_rate / bare_rate
            print(
                f"{alg} {path:7s}  bare jwt.decode {bare_rate:8.0f}/s ({r[bare_key] * 1e6:6.1f} µs)   "
                f"TokenVerifier {ours_rate:8.0f}/s ({r[ours_key] * 1e6:6.1f} µs)   ratio {ratio:6.1%}"
            )
            tag = f"{alg.lower()}_{path}"
            summary += [
                f"{tag}_bare={bare_rate:.0f}",
                f"{tag}_verifier={ours_rate:.0f}",
                f"{tag}_ratio={ratio:.3f}",
            ]
    print(" ".join(summary))


if __name__ == "__main__":
    main()

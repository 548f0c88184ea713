#!/usr/bin/env python
"""Token-endpoint throughput over real HTTP on loopback.

Starts its own Countersign web process (``_stack.start_web``: the production
serving command) on 127.0.0.1 with a fresh database, prepares authorization codes directly in that
database, then measures two phases against ``POST /o/token/``:

1. code exchange: ``grant_type=authorization_code`` with PKCE S256 and HTTP
   Basic client authentication, ``--requests`` of them at ``--concurrency``;
2. refresh chains: ``--chains`` concurrent chains, each refreshing
   sequentially with the refresh token from its previous response (rotation),
   ``--refreshes`` in total.

Usage (from the project root)::

    .venv/bin/python bench/token_endpoint.py                       # SQLite, 1 worker
    .venv/bin/python bench/token_endpoint.py --workers 2
    .venv/bin/python bench/token_endpoint.py \\
        --database-url postgres://postgres@127.0.0.1:5432/countersign_bench

The load generator is ``_stack.LeanHttp`` (kept-alive asyncio streams): httpx cost more CPU per
request than the server spent answering it. Printed per phase: requests/s, latency percentiles, and CPU per request of the
web process group and of this load generator. Everything is bounded: fixed
request counts, a per-request timeout and a global ``--timeout``; the server it
starts is always stopped (its whole process group), and a PostgreSQL database it
created is dropped. Nothing is asserted on timing. The last line of output is
one ``key=value`` line meant for comparing runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from _stack import (
    BENCH_LIMITS_ENV,
    CpuUsage,
    LeanHttp,
    Stack,
    check_database_url,
    dist,
    free_port,
    log,
    percentiles_ms,
    run_main,
    start_web,
)

T = TypeVar("T")
# What a request over LeanHttp raises when the server refuses, resets, cuts short or times out.
TRANSPORT_ERRORS = (OSError, EOFError, TimeoutError, ValueError)

REDIRECT_URI = "http://127.0.0.1:8199/callback"

# Runs in a subprocess with the bench environment (DATABASE_URL, COUNTERSIGN_VAR_DIR):
# one scope, one agent, one user, then one session grant and one authorization code per
# code exchange, written to a JSON file with the PKCE verifiers. Rows go straight into
# the database (the consent screen is not what is being measured).
SETUP_SCRIPT = r'''
import base64, hashlib, json, secrets, sys
from datetime import timedelta

import django
django.setup()

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from consent.keys import active_signing_key
from consent.models import AuthorizationCode, ScopePolicy
from consent.services import AuthContext, agent_create, grant_create, scope_set

out_path, n_codes, redirect_uri = sys.argv[1], int(sys.argv[2]), sys.argv[3]
SCOPE = "bench:read"
LIFETIME = 24 * 3600

with transaction.atomic():
    scope_set(name=SCOPE, values={"audience": "http://bench.test", "description": "Benchmark scope",
                                  "sensitivity": ScopePolicy.Sensitivity.STANDARD}, actor="bench")
    agent, secret = agent_create(name="Bench Agent", publisher="bench", scopes=[SCOPE],
                                 redirect_uris=[redirect_uri], actor="bench")
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(24))
active_signing_key()  # created now, not by the first timed request

now = timezone.now()
auth = AuthContext(auth_time=now, amr=["pwd"])
shown = {"agent": {"name": agent.name}, "lifetime_seconds": LIFETIME}


def make_codes(for_agent, n):
    """One consent (session grant) and one PKCE authorization code per exchange, as in real use."""
    pairs, rows = [], []
    with transaction.atomic():
        for _ in range(n):
            grant = grant_create(user=user, agent=for_agent, scopes=[SCOPE], lifetime=LIFETIME, auth=auth,
                                 consent_shown=shown)
            verifier = secrets.token_urlsafe(48)
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            code = secrets.token_urlsafe(24)
            rows.append(AuthorizationCode(
                application=for_agent, user=user, code=code, expires=now + timedelta(hours=1),
                redirect_uri=redirect_uri, scope=SCOPE, code_challenge=challenge,
                code_challenge_method="S256", session_grant=grant,
            ))
            pairs.append([code, verifier])
        AuthorizationCode.objects.bulk_create(rows, batch_size=500)
    return pairs


codes = make_codes(agent, n_codes)

# An agent in refresh mode "exchange" with a registered key, for RFC 8693 re-mints (private_key_jwt).
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

key = ec.generate_private_key(ec.SECP256R1())
jwk = {**json.loads(ECAlgorithm.to_jwk(key.public_key())), "kid": "bench-1", "alg": "ES256"}
x_agent, x_secret = agent_create(name="Bench Exchange Agent", publisher="bench", scopes=[SCOPE],
                                 redirect_uris=[redirect_uri], refresh_mode="exchange", jwks={"keys": [jwk]},
                                 actor="bench")
x_codes = make_codes(x_agent, int(sys.argv[4]))

with open(out_path, "w") as fh:
    json.dump({"client_id": agent.client_id, "client_secret": secret, "redirect_uri": redirect_uri,
               "scope": SCOPE, "codes": codes,
               "exchange": {"client_id": x_agent.client_id, "client_secret": x_secret, "kid": "bench-1",
                            "private_pem": key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()).decode(),
                            "codes": x_codes}}, fh)
'''


# --- phases ---------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    latencies: list[float] = field(default_factory=list)  # seconds, successful and failed
    errors: int = 0
    first_error: str = ""
    wall: float = 0.0
    cpu: CpuUsage | None = None  # per process kind, and this load generator's
    skipped: int = 0  # requests not sent (deadline reached)

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.wall if self.wall > 0 else 0.0

    def note_error(self, text: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = text[:2000]


class TokenClient:
    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        concurrency: int,
        request_timeout: float,
    ) -> None:
        self.redirect_uri = redirect_uri
        cred = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self.client = LeanHttp(
            base_url,
            headers={"Authorization": f"Basic {cred}", "Accept": "application/json"},
            timeout=request_timeout,
            max_idle=concurrency,
        )

    async def post(self, data: dict[str, str], result: PhaseResult) -> dict[str, Any] | None:
        start = time.perf_counter()
        try:
            response = await self.client.post("/o/token/", data=data)
        except TRANSPORT_ERRORS as exc:
            result.latencies.append(time.perf_counter() - start)
            result.note_error(f"{type(exc).__name__}: {exc}")
            return None
        result.latencies.append(time.perf_counter() - start)
        if response.status_code != 200:
            result.note_error(f"HTTP {response.status_code}: {response.text}")
            return None
        try:
            body: dict[str, Any] = response.json()
            return body
        except ValueError:
            result.note_error(f"HTTP 200 with a body that is not JSON: {response.text[:500]}")
            return None

    async def exchange(self, code: str, verifier: str, result: PhaseResult) -> dict[str, Any] | None:
        return await self.post(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": verifier,
            },
            result,
        )

    async def refresh(self, refresh_token: str, result: PhaseResult) -> dict[str, Any] | None:
        return await self.post({"grant_type": "refresh_token", "refresh_token": refresh_token}, result)

    async def aclose(self) -> None:
        await self.client.aclose()


async def run_code_exchanges(
    tc: TokenClient, codes: list[list[str]], concurrency: int, deadline: float, result: PhaseResult
) -> list[str]:
    """Exchange every code with ``concurrency`` workers; returns the refresh tokens issued."""
    refresh_tokens: list[str] = []
    queue = iter(codes)

    async def worker() -> None:
        for code, verifier in queue:  # a shared iterator: each code is taken once
            if time.monotonic() > deadline:
                result.skipped += 1
                continue
            body = await tc.exchange(code, verifier, result)
            if body is None:
                continue
            if "access_token" not in body:
                result.note_error(f"200 without access_token: {json.dumps(body)[:500]}")
            elif "refresh_token" in body:
                refresh_tokens.append(body["refresh_token"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return refresh_tokens


async def run_refresh_chains(
    tc: TokenClient, starts: list[str], total: int, deadline: float, result: PhaseResult
) -> None:
    chains = len(starts)

    async def chain(i: int, token: str) -> None:
        steps = total // chains + (1 if i < total % chains else 0)
        for done in range(steps):
            if time.monotonic() > deadline:
                result.skipped += steps - done
                return
            body = await tc.refresh(token, result)
            if body is None:
                result.skipped += steps - done - 1  # the chain cannot continue without a token
                return
            refreshed = body.get("refresh_token")
            if not refreshed:
                result.note_error(f"refresh response without refresh_token: {json.dumps(body)[:500]}")
                result.skipped += steps - done - 1
                return
            token = refreshed

    await asyncio.gather(*(chain(i, t) for i, t in enumerate(starts)))


class ExchangeClient:
    """An agent re-minting through RFC 8693 token exchange, authenticated with private_key_jwt (RFC 7523)."""

    def __init__(self, base_url: str, data: dict[str, Any], concurrency: int, request_timeout: float) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.client_id = data["client_id"]
        self.kid = data["kid"]
        key = serialization.load_pem_private_key(data["private_pem"].encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), "the agent's key is P-256"
        self.key = key
        self.audience = f"{base_url}/o/token/"
        self.client = LeanHttp(
            base_url, headers={"Accept": "application/json"}, timeout=request_timeout, max_idle=concurrency
        )

    def assertion(self) -> str:
        import jwt

        now = int(time.time())
        return jwt.encode(
            {
                "iss": self.client_id,
                "sub": self.client_id,
                "aud": self.audience,
                "iat": now,
                "exp": now + 60,
                "jti": secrets.token_urlsafe(16),
            },
            self.key,
            algorithm="ES256",
            headers={"kid": self.kid},
        )

    async def remint(self, subject_token: str, result: PhaseResult) -> str | None:
        data = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": subject_token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": self.assertion(),
        }
        start = time.perf_counter()
        try:
            response = await self.client.post("/o/token/", data=data)
        except TRANSPORT_ERRORS as exc:
            result.latencies.append(time.perf_counter() - start)
            result.note_error(f"{type(exc).__name__}: {exc}")
            return None
        result.latencies.append(time.perf_counter() - start)
        if response.status_code != 200:
            result.note_error(f"HTTP {response.status_code}: {response.text}")
            return None
        token: str | None = response.json().get("access_token")
        return token

    async def aclose(self) -> None:
        await self.client.aclose()


async def run_exchange_chains(
    xc: ExchangeClient, starts: list[str], total: int, deadline: float, result: PhaseResult
) -> None:
    """Each chain re-mints from the token the previous re-mint returned."""
    chains = len(starts)

    async def chain(i: int, token: str) -> None:
        steps = total // chains + (1 if i < total % chains else 0)
        for done in range(steps):
            if time.monotonic() > deadline:
                result.skipped += steps - done
                return
            reminted = await xc.remint(token, result)
            if reminted is None:
                result.skipped += steps - done - 1
                return
            token = reminted

    await asyncio.gather(*(chain(i, t) for i, t in enumerate(starts)))


async def timed(result: PhaseResult, stack: Stack, coro: Awaitable[T]) -> T:
    before = stack.cpu_sample()
    value = await coro
    result.cpu = stack.cpu_usage(before, stack.cpu_sample())
    result.wall = result.cpu.wall
    return value


def report(result: PhaseResult, workers: int, cores: int) -> None:
    log(f"\n[{result.name}]")
    log(
        f"  requests        {result.requests}" + (f"  (not sent: {result.skipped})" if result.skipped else "")
    )
    log(f"  errors          {result.errors}")
    if result.first_error:
        log(f"  first error     {result.first_error}")
    log(f"  wall seconds    {result.wall:.3f}")
    log(f"  requests/s      {result.rps:.1f}")
    if workers <= cores:
        log(
            f"  requests/s/core {result.rps / workers:.1f}  (rps / workers; workers={workers} <= cores={cores})"
        )
    else:
        log(f"  requests/s/core n/a (workers={workers} > cores={cores})")
    log(f"  latency         {dist(result.latencies)}")
    if result.cpu is not None and result.requests:
        log(f"  CPU             {result.cpu.line(result.requests)}")
        log(f"  machine         {result.cpu.machine_line(cores)}")


def web_cpu_ms(result: PhaseResult) -> float:
    if result.cpu is None:
        return 0.0
    return result.cpu.per(result.requests).get("web") or 0.0


# --- the run ----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.deadline = stack.deadline

    def database_url(self) -> str:
        return self.args.database_url or f"sqlite:///{self.stack.tmp / 'bench.sqlite3'}"

    def env(self, port: int) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("SECRET_KEY", "DEBUG", "ALLOWED_HOSTS"):
            env.pop(name, None)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "DATABASE_URL": self.database_url(),
                "COUNTERSIGN_VAR_DIR": str(self.stack.tmp),
                "COUNTERSIGN_ISSUER": f"http://127.0.0.1:{port}",
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
                **BENCH_LIMITS_ENV,
            }
        )
        if self.args.redis_url:
            env["REDIS_URL"] = self.args.redis_url
        return env

    def run(self) -> int:
        args, stack = self.args, self.stack
        cores = os.cpu_count() or 1
        db = "postgresql" if args.database_url else "sqlite"
        port = free_port()
        env = self.env(port)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        log(
            f"setup (db={db}, workers={args.workers}, cores={cores}, load average {load:.2f}, tmp={stack.tmp})"
        )
        if args.database_url:
            stack.create_database(args.database_url, drop_existing=args.drop_existing)
        stack.run_step([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], env, "migrate")
        codes_path = stack.tmp / "codes.json"
        n_codes = args.warmup + args.requests
        stack.run_step(
            [
                sys.executable,
                "-c",
                SETUP_SCRIPT,
                str(codes_path),
                str(n_codes),
                REDIRECT_URI,
                str(args.chains),
            ],
            env,
            f"agent, user, {n_codes} grants and codes",
        )
        data = json.loads(codes_path.read_text())
        stack.analyze(env["DATABASE_URL"])
        web = start_web(stack, "web", port, env, workers=args.workers)
        stack.wait_http(web, "/.well-known/oauth-authorization-server")
        log(f"  server ready on 127.0.0.1:{port}")
        results = asyncio.run(self.phases(port, data))
        server_log = stack.log_tail("web", 6000)
        code_result, refresh_result, exchange_result = results

        for r in results:
            report(r, args.workers, cores)
        if any(r.errors for r in results) and server_log.strip():
            log("\nserver log (tail):\n" + server_log)
        per_core = args.workers <= cores
        lat = {
            n: percentiles_ms(r.latencies)
            for n, r in zip(("code_exchange", "refresh", "exchange"), results, strict=True)
        }
        summary = (
            f"token_endpoint code_exchange_rps={code_result.rps:.1f} refresh_rps={refresh_result.rps:.1f} "
            f"exchange_rps={exchange_result.rps:.1f} "
            f"code_exchange_web_cpu_ms={web_cpu_ms(code_result):.2f} "
            f"refresh_web_cpu_ms={web_cpu_ms(refresh_result):.2f} "
            f"exchange_web_cpu_ms={web_cpu_ms(exchange_result):.2f} "
            + " ".join(f"{n}_p50_ms={q['p50']:.2f} {n}_p99_ms={q['p99']:.2f}" for n, q in lat.items())
            + f" workers={args.workers} db={db} concurrency={args.concurrency} chains={args.chains} "
            f"cores={cores} errors={sum(r.errors for r in results)}"
        )
        if per_core:
            summary += (
                f" code_exchange_rps_per_core={code_result.rps / args.workers:.1f}"
                f" refresh_rps_per_core={refresh_result.rps / args.workers:.1f}"
                f" exchange_rps_per_core={exchange_result.rps / args.workers:.1f}"
            )
        log("")
        log(summary)
        failed = any(r.errors or r.skipped for r in results)
        return 1 if failed else 0

    async def phases(self, port: int, data: dict[str, Any]) -> tuple[PhaseResult, PhaseResult, PhaseResult]:
        args, stack = self.args, self.stack
        tc = TokenClient(
            f"http://127.0.0.1:{port}",
            data["client_id"],
            data["client_secret"],
            data["redirect_uri"],
            max(args.concurrency, args.chains),
            args.request_timeout,
        )
        try:
            codes = data["codes"]
            warm, timed_codes = codes[: args.warmup], codes[args.warmup :]
            if warm:
                warm_result = PhaseResult("warm-up")
                await run_code_exchanges(tc, warm, args.concurrency, self.deadline, warm_result)
                log(
                    f"  warm-up: {warm_result.requests} code exchanges, {warm_result.errors} errors"
                    + (f" (first: {warm_result.first_error[:300]})" if warm_result.first_error else "")
                )

            code_result = PhaseResult(
                f"code exchange: {len(timed_codes)} requests, concurrency {args.concurrency}"
            )
            refresh_tokens = await timed(
                code_result,
                stack,
                run_code_exchanges(tc, timed_codes, args.concurrency, self.deadline, code_result),
            )

            starts = refresh_tokens[: args.chains]
            refresh_result = PhaseResult(f"refresh chains: {args.refreshes} requests, {len(starts)} chains")
            if len(starts) < args.chains:
                refresh_result.note_error(
                    f"only {len(starts)} refresh tokens from phase 1 for {args.chains} chains"
                )
            if starts:
                await timed(
                    refresh_result,
                    stack,
                    run_refresh_chains(tc, starts, args.refreshes, self.deadline, refresh_result),
                )

            x = data["exchange"]
            xtc = TokenClient(
                f"http://127.0.0.1:{port}",
                x["client_id"],
                x["client_secret"],
                data["redirect_uri"],
                args.chains,
                args.request_timeout,
            )
            first = PhaseResult("exchange agent: first session tokens")
            x_starts: list[str] = []
            for code, verifier in x["codes"]:
                body = await xtc.exchange(code, verifier, first)
                if body and "access_token" in body:
                    x_starts.append(body["access_token"])
            await xtc.aclose()
            xc = ExchangeClient(f"http://127.0.0.1:{port}", x, args.chains, args.request_timeout)
            exchange_result = PhaseResult(
                f"token-exchange re-mints (private_key_jwt): {args.refreshes} requests, "
                f"{len(x_starts)} chains"
            )
            if first.errors:
                exchange_result.note_error(f"could not start the exchange chains: {first.first_error}")
            elif x_starts:
                await timed(
                    exchange_result,
                    stack,
                    run_exchange_chains(xc, x_starts, args.refreshes, self.deadline, exchange_result),
                )
            await xc.aclose()
            return code_result, refresh_result, exchange_result
        finally:
            await tc.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="code exchanges in phase 1 (default: 2000)")
    p.add_argument("--refreshes", type=int, default=None, help="refreshes in phase 2 (default: --requests)")
    p.add_argument(
        "--concurrency", type=int, default=8, help="concurrent code exchanges in phase 1 (default: 8)"
    )
    p.add_argument(
        "--chains", type=int, default=None, help="concurrent refresh chains (default: --concurrency)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed code exchanges first (default: 25 per worker)"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="web server worker processes, as WEB_CONCURRENCY (default: 1)"
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL on loopback, e.g. postgres://postgres@127.0.0.1:5432/countersign_bench; "
        "the database is created for the run and dropped after it (default: SQLite in a temp dir)",
    )
    p.add_argument(
        "--drop-existing",
        action="store_true",
        help="with --database-url: drop the database first if it already exists",
    )
    p.add_argument(
        "--timeout", type=float, default=900, help="global limit in seconds for the whole run (default: 900)"
    )
    p.add_argument(
        "--request-timeout", type=float, default=30, help="per-request timeout in seconds (default: 30)"
    )
    p.add_argument(
        "--redis-url", default="", help="REDIS_URL for the server (default: the product setting's)"
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server log, SQLite file)")
    args = p.parse_args(argv)
    args.refreshes = args.requests if args.refreshes is None else args.refreshes
    args.chains = args.concurrency if args.chains is None else args.chains
    args.warmup = 25 * args.workers if args.warmup is None else args.warmup
    for name in ("requests", "concurrency", "chains", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.refreshes < 0 or args.warmup < 0:
        p.error("--refreshes and --warmup must not be negative")
    if args.chains > args.requests:
        p.error("--chains cannot exceed --requests (each chain starts from a phase-1 refresh token)")
    if args.database_url:
        check_database_url(p, "--database-url", args.database_url, reserved=())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with Stack(prefix="bench", timeout=args.timeout, keep_tmp=args.keep_tmp) as stack:
        return Bench(args, stack).run()


if __name__ == "__main__":
    sys.exit(run_main(main))

#!/usr/bin/env python
"""Countersign's token endpoint beside stock django-oauth-toolkit and beside the floor, in one run.

Three servers on loopback against the same PostgreSQL server (a database each), each one web
process started by ``_stack.start_web`` (the production serving command; the peers run under the
same server program with the same options, only the application differs):

  countersign  ``POST /o/token/``: authorization code + PKCE S256 with HTTP Basic (setup as in
               token_endpoint.py), and refresh-token chains (rotation);
  dot          stock django-oauth-toolkit (``bench/peers/dotpeer``), ``client_credentials``, one
               Application; client secrets hashed with a salted SHA-256 instead of DOT's default
               PBKDF2 (1,000,000 iterations), so the comparison is not about the hasher;
  floor        ``bench/peers/floor.py``, no framework: one SELECT of the client + constant-time
               salted SHA-256 compare, an ES256 JWT from PyJWT (key loaded once), one INSERT, JSON.

Rounds are interleaved (countersign code exchange, countersign refresh, dot, floor; again ...),
``--requests`` requests per phase per round at ``--concurrency``, so machine noise lands on every
side alike. Per server it prints the median over rounds of requests/s and server CPU per request
(utime+stime of the server's process group), the load generator's CPU per request, and latency
percentiles over all rounds; then the ratios, each the median of the per-round ratios. The load
generator is asyncio over raw sockets with keep-alive and prebuilt requests.

Usage (from the project root)::

    .venv/bin/python bench/peers.py
    .venv/bin/python bench/peers.py --rounds 9 --requests 1000 --concurrency 8

Bounded: fixed counts, per-request and global timeouts, a watchdog; every process group is
killed and every database dropped at the end, also on Ctrl-C or an error. Nothing is asserted on
timing; the figures are comparisons within one run. The last line is ``key=value``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from _stack import (
    BENCH,
    BENCH_LIMITS_ENV,
    App,
    Stack,
    check_database_url,
    free_port,
    loadavg,
    log,
    median,
    percentiles_ms,
    postgres_cpu_seconds,
    run_main,
    start_web,
)
from token_endpoint import REDIRECT_URI, SETUP_SCRIPT

PEERS = BENCH / "peers"
DOT = App(wsgi="dotpeer.wsgi:application", asgi="dotpeer.asgi:application")
FLOOR = App(wsgi="floor:application", asgi="floor:asgi_application")
HASHER_NOTE = (
    "dot: stock models and settings; client secret hashed with a salted SHA-256 "
    "(CLIENT_SECRET_HASHER=peer_sha256, hash_client_secret=True) instead of DOT's default PBKDF2"
)

DOT_SETUP = r"""
import json, secrets, sys
import django
django.setup()
from oauth2_provider.models import Application

secret = secrets.token_urlsafe(32)
app = Application.objects.create(name="peer", client_type=Application.CLIENT_CONFIDENTIAL,
                                 authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
                                 client_secret=secret, hash_client_secret=True)
app.refresh_from_db()
assert app.client_secret.startswith("peer_sha256$"), app.client_secret[:20]
json.dump({"client_id": app.client_id, "client_secret": secret}, open(sys.argv[1], "w"))
"""

FLOOR_SCHEMA = """
CREATE TABLE floor_client (client_id text PRIMARY KEY, secret_salt text NOT NULL, secret_hash text NOT NULL);
CREATE TABLE floor_token (id bigserial PRIMARY KEY, jti text NOT NULL UNIQUE, client_id text NOT NULL
                          REFERENCES floor_client, expires timestamptz NOT NULL,
                          created timestamptz NOT NULL DEFAULT now());
"""


# --- the load generator: raw HTTP/1.1 over asyncio streams, keep-alive ------------------------------


def post_bytes(port: int, path: str, authorization: str, form: dict[str, str]) -> bytes:
    body = urlencode(form).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {authorization}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nAccept: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


class Connection:
    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        """One request on the kept-alive connection; once more on a fresh one if the server had
        closed it before answering (the request was not processed)."""
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), self.timeout
                )
            try:
                self.writer.write(payload)
                return await asyncio.wait_for(self._response(), self.timeout)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                await self.close()
                if attempt or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        close = b"\r\nconnection: close" in lower
        if b"\r\ntransfer-encoding: chunked" in lower:
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            body = b"".join(chunks)
        else:
            i = lower.find(b"\r\ncontent-length:")
            if i < 0:
                raise ConnectionError("response without Content-Length or chunked encoding")
            length = int(lower[i + 17 : lower.index(b"\r\n", i + 2)])
            body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body


@dataclass
class Phase:
    server: str
    kind: str  # code, refresh, cc
    requests: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    server_cpu: float | None = None
    client_cpu: float = 0.0
    db_cpu: float | None = None

    def note(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text[:500]

    @property
    def rps(self) -> float:
        return self.requests / self.wall if self.wall else 0.0

    @property
    def cpu_ms(self) -> float | None:
        return (
            None if self.server_cpu is None or not self.requests else 1000 * self.server_cpu / self.requests
        )

    @property
    def db_ms(self) -> float | None:
        return None if self.db_cpu is None or not self.requests else 1000 * self.db_cpu / self.requests

    @property
    def client_ms(self) -> float:
        return 1000 * self.client_cpu / self.requests if self.requests else 0.0


async def drive(conns: list[Connection], phase: Phase, work) -> None:
    """Run ``work(conn, phase)`` on every connection at once (one coroutine per connection)."""
    await asyncio.gather(*(work(c, phase) for c in conns))


async def timed_request(conn: Connection, payload: bytes, phase: Phase) -> bytes | None:
    t0 = time.perf_counter()
    try:
        status, body = await conn.request(payload)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        phase.latencies.append(time.perf_counter() - t0)
        phase.requests += 1
        phase.note(f"{type(exc).__name__}: {exc}")
        await conn.close()
        return None
    phase.latencies.append(time.perf_counter() - t0)
    phase.requests += 1
    if status != 200 or b'"access_token"' not in body:
        phase.note(f"HTTP {status}: {body[:300]!r}")
        return None
    return body


# --- the servers ------------------------------------------------------------------------------------


class Peers:
    def __init__(self, args, stack: Stack) -> None:
        self.args, self.stack = args, stack
        base = args.database_url.rstrip("/")
        self.db = {"countersign": f"{base}_cs", "dot": f"{base}_dot", "floor": f"{base}_floor"}
        self.ports = {name: free_port() for name in self.db}
        self.secret_key = secrets.token_urlsafe(50)

    def env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "DJANGO_SETTINGS_MODULE", "PYTHONPATH"):
            env.pop(var, None)
        env.update({"PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING", "SECRET_KEY": self.secret_key})
        if name == "countersign":
            env.update(
                {
                    "DJANGO_SETTINGS_MODULE": "config.settings",
                    "DATABASE_URL": self.db[name],
                    "COUNTERSIGN_VAR_DIR": str(self.stack.tmp),
                    "COUNTERSIGN_ISSUER": f"http://127.0.0.1:{self.ports[name]}",
                    **BENCH_LIMITS_ENV,
                }
            )
            if self.args.redis_url:
                env["REDIS_URL"] = self.args.redis_url
        elif name == "dot":
            env.update(
                {
                    "DJANGO_SETTINGS_MODULE": "dotpeer.settings",
                    "DATABASE_URL": self.db[name],
                    "PYTHONPATH": str(PEERS),
                }
            )
        else:
            env.update(
                {
                    "FLOOR_DATABASE_URL": self.db[name],
                    "FLOOR_KEY_PATH": str(self.stack.tmp / "floor.pem"),
                    "FLOOR_ISSUER": f"http://127.0.0.1:{self.ports[name]}",
                    "PYTHONPATH": str(PEERS),
                }
            )
        return env

    def setup(self) -> dict:
        args, stack = self.args, self.stack
        for url in self.db.values():
            stack.create_database(url, drop_existing=args.drop_existing)
        out: dict = {}

        env = self.env("countersign")
        stack.run_step(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], env, "countersign: migrate"
        )
        n_codes = args.warmup + args.rounds * args.requests
        path = stack.tmp / "countersign.json"
        stack.run_step(
            [sys.executable, "-c", SETUP_SCRIPT, str(path), str(n_codes), REDIRECT_URI, "0"],
            env,
            f"countersign: agent, user, {n_codes} grants and codes",
        )
        out["countersign"] = json.loads(path.read_text())

        env = self.env("dot")
        stack.run_step(
            [sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"], env, "dot: migrate"
        )
        path = stack.tmp / "dot.json"
        stack.run_step([sys.executable, "-c", DOT_SETUP, str(path)], env, "dot: one Application")
        out["dot"] = json.loads(path.read_text())

        out["floor"] = self.floor_setup()
        for url in self.db.values():
            stack.analyze(url)
        return out

    def floor_setup(self) -> dict:
        import hashlib

        import psycopg
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        (self.stack.tmp / "floor.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        client_id, secret, salt = secrets.token_urlsafe(16), secrets.token_urlsafe(32), secrets.token_hex(8)
        with psycopg.connect(self.db["floor"], connect_timeout=10) as conn:
            conn.execute(FLOOR_SCHEMA)
            conn.execute(
                "INSERT INTO floor_client VALUES (%s, %s, %s)",
                [client_id, salt, hashlib.sha256(f"{salt}${secret}".encode()).hexdigest()],
            )
        log("  floor: schema, one client, an ES256 key")
        return {"client_id": client_id, "client_secret": secret}

    def start(self) -> None:
        stack = self.stack
        procs = {
            "countersign": start_web(
                stack, "countersign", self.ports["countersign"], self.env("countersign")
            ),
            "dot": start_web(stack, "dot", self.ports["dot"], self.env("dot"), app=DOT),
            "floor": start_web(stack, "floor", self.ports["floor"], self.env("floor"), app=FLOOR),
        }
        stack.wait_http(procs["countersign"], "/.well-known/oauth-authorization-server")
        stack.wait_port(procs["dot"])
        stack.wait_http(procs["floor"], "/healthz")


# --- the run -----------------------------------------------------------------------------------------


async def measure(stack: Stack, name: str, phase: Phase, conns: list[Connection], work) -> Phase:
    before, db_before = stack.cpu_sample({"web": [name]}), postgres_cpu_seconds()
    await drive(conns, phase, work)
    usage, db_after = stack.cpu_usage(before, stack.cpu_sample({"web": [name]})), postgres_cpu_seconds()
    phase.wall, phase.server_cpu, phase.client_cpu = usage.wall, usage.kinds["web"], usage.client
    phase.db_cpu = None if db_before is None or db_after is None else db_after - db_before
    return phase


async def run_rounds(peers: Peers, data: dict) -> dict[str, list[Phase]]:
    args, stack, ports = peers.args, peers.stack, peers.ports
    cs = data["countersign"]
    cs_auth = basic(cs["client_id"], cs["client_secret"])
    cs_codes = iter(cs["codes"])

    def code_request(code: str, verifier: str) -> bytes:
        return post_bytes(
            ports["countersign"],
            "/o/token/",
            cs_auth,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": cs["redirect_uri"],
                "code_verifier": verifier,
            },
        )

    def refresh_request(token: str) -> bytes:
        return post_bytes(
            ports["countersign"],
            "/o/token/",
            cs_auth,
            {"grant_type": "refresh_token", "refresh_token": token},
        )

    cc = {
        name: post_bytes(
            ports[name],
            path,
            basic(data[name]["client_id"], data[name]["client_secret"]),
            {"grant_type": "client_credentials"},
        )
        for name, path in (("dot", "/o/token/"), ("floor", "/token"))
    }
    conns = {
        name: [Connection(ports[name], args.request_timeout) for _ in range(args.concurrency)]
        for name in ports
    }
    chains: list[str] = []  # the current refresh token of each chain (one chain per connection)

    def code_work(batch: list[bytes], refresh_tokens: list[str] | None = None):
        it = iter(batch)

        async def work(conn: Connection, phase: Phase) -> None:
            for payload in it:  # a shared iterator: each code is taken once
                body = await timed_request(conn, payload, phase)
                if body is not None and refresh_tokens is not None:
                    refresh_tokens.append(json.loads(body)["refresh_token"])

        return work

    def refresh_work(n: int):
        per = [n // len(chains) + (1 if i < n % len(chains) else 0) for i in range(len(chains))]
        slots = iter(range(len(chains)))

        async def work(conn: Connection, phase: Phase) -> None:
            i = next(slots)
            for _ in range(per[i]):
                body = await timed_request(conn, refresh_request(chains[i]), phase)
                if body is None:
                    return  # the chain cannot go on without a token
                chains[i] = json.loads(body)["refresh_token"]

        return work

    def cc_work(payload: bytes, n: int):
        left = iter(range(n))

        async def work(conn: Connection, phase: Phase) -> None:
            for _ in left:
                await timed_request(conn, payload, phase)

        return work

    results: dict[str, list[Phase]] = {k: [] for k in ("code", "refresh", "dot", "floor")}
    try:
        # warm-up, untimed: code exchanges that also start the refresh chains, and the peers
        warm = [code_request(*next(cs_codes)) for _ in range(args.warmup)]
        w = Phase("countersign", "warm-up")
        await drive(conns["countersign"], w, code_work(warm, chains))
        del chains[args.concurrency :]
        for name in ("dot", "floor"):
            await drive(conns[name], Phase(name, "warm-up"), cc_work(cc[name], args.warmup))
        log(
            f"  warm-up: {args.warmup} requests per server; countersign errors {w.errors}"
            + (f" (first: {w.first_error})" if w.first_error else "")
        )
        if len(chains) < args.concurrency:
            raise SystemExit(f"warm-up gave {len(chains)} refresh tokens for {args.concurrency} chains")

        for r in range(args.rounds):
            if time.monotonic() > stack.deadline - 30:
                log(f"  global deadline near: stopping after {r} rounds")
                break
            batch = [code_request(*next(cs_codes)) for _ in range(args.requests)]
            results["code"].append(
                await measure(
                    stack, "countersign", Phase("countersign", "code"), conns["countersign"], code_work(batch)
                )
            )
            results["refresh"].append(
                await measure(
                    stack,
                    "countersign",
                    Phase("countersign", "refresh"),
                    conns["countersign"],
                    refresh_work(args.requests),
                )
            )
            for name in ("dot", "floor"):
                results[name].append(
                    await measure(
                        stack, name, Phase(name, "cc"), conns[name], cc_work(cc[name], args.requests)
                    )
                )
            log(
                f"  round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1].rps:.0f}/s {v[-1].cpu_ms or 0:.2f} ms" for k, v in results.items())
                + f"  (load {loadavg()})"
            )
    finally:
        for group in conns.values():
            for conn in group:
                await conn.close()
    return results


LABELS = {
    "code": "countersign code exchange (PKCE, Basic)",
    "refresh": "countersign refresh (rotation)",
    "dot": "stock DOT client_credentials",
    "floor": "floor (no framework) client_credentials",
}


def report(results: dict[str, list[Phase]], args) -> tuple[dict, dict]:
    rows = {}
    log(
        f"\n{'phase':42s} {'req/s':>8s} {'server CPU':>11s} {'PG CPU':>8s} {'client CPU':>11s} {'p50':>8s}"
        f" {'p99':>8s} errors"
    )
    log(f"{'':42s} {'median':>8s} {'ms/req':>11s} {'ms/req':>8s} {'ms/req':>11s} {'ms':>8s} {'ms':>8s}")
    for key, phases in results.items():
        lat = percentiles_ms(x for p in phases for x in p.latencies)
        row = {
            "rps": median(p.rps for p in phases) or 0.0,
            "cpu": median(p.cpu_ms for p in phases),
            "client": median(p.client_ms for p in phases) or 0.0,
            "db": median(p.db_ms for p in phases),
            "p50": lat["p50"],
            "p99": lat["p99"],
            "errors": sum(p.errors for p in phases),
        }
        rows[key] = row
        cpu = f"{row['cpu']:.2f}" if row["cpu"] is not None else "n/a"
        db = f"{row['db']:.2f}" if row["db"] is not None else "n/a"
        log(
            f"{LABELS[key]:42s} {row['rps']:8.1f} {cpu:>11s} {db:>8s} {row['client']:11.2f} {row['p50']:8.2f} "
            f"{row['p99']:8.2f} {row['errors']}"
        )
        for p in phases:
            if p.first_error:
                log(f"    first error: {p.first_error}")
                break
    n = min(len(v) for v in results.values())

    def ratio(a: str, b: str, attr: str) -> float | None:
        values = [
            getattr(results[a][i], attr) / getattr(results[b][i], attr)
            for i in range(n)
            if getattr(results[a][i], attr) and getattr(results[b][i], attr)
        ]
        return statistics.median(values) if values else None

    ratios = {f"{k}_rps_vs_dot": ratio(k, "dot", "rps") for k in ("code", "refresh")}
    ratios.update({f"{k}_cpu_vs_floor": ratio(k, "floor", "cpu_ms") for k in ("code", "refresh")})
    ratios["dot_cpu_vs_floor"] = ratio("dot", "floor", "cpu_ms")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    log(f"\nratios (median of {n} per-round ratios):")
    log(
        f"  countersign req/s / DOT req/s             code exchange {fmt(ratios['code_rps_vs_dot'])}, "
        f"refresh {fmt(ratios['refresh_rps_vs_dot'])}  (DOT does client_credentials: less work per request)"
    )
    log(
        f"  countersign CPU/req / floor CPU/req       code exchange {fmt(ratios['code_cpu_vs_floor'])}, "
        f"refresh {fmt(ratios['refresh_cpu_vs_floor'])}"
    )
    log(f"  DOT CPU/req / floor CPU/req               {fmt(ratios['dot_cpu_vs_floor'])}")
    return rows, ratios


def run(args, stack: Stack) -> int:
    peers = Peers(args, stack)
    cores = os.cpu_count() or 1
    log(f"setup (cores={cores}, load average {loadavg()}, tmp={stack.tmp})")
    data = peers.setup()
    peers.start()
    log("  servers ready: " + ", ".join(f"{n} 127.0.0.1:{p}" for n, p in peers.ports.items()))
    log(
        f"\n{args.rounds} interleaved rounds x {args.requests} requests per phase, concurrency {args.concurrency}, "
        f"{HASHER_NOTE}"
    )
    results = asyncio.run(run_rounds(peers, data))
    if not results["code"]:
        raise SystemExit("no round completed")
    logs = {n: stack.log_tail(n, 3000) for n in peers.ports}
    rows, ratios = report(results, args)
    errors = sum(r["errors"] for r in rows.values())
    if errors:
        for n, text in logs.items():
            log(f"\n--- {n} log (tail)\n{text}")
    log(
        "\nserver CPU: utime+stime of the server's process group; PG CPU: of every PostgreSQL process on"
        " this machine during the phase (the server's statements, and whatever else ran on it)."
    )
    log("")
    line = ["peers"]
    for key, row in rows.items():
        line += [
            f"{key}_rps={row['rps']:.1f}",
            f"{key}_cpu_ms={row['cpu'] or 0:.2f}",
            f"{key}_db_cpu_ms={row['db'] or 0:.2f}",
            f"{key}_p50_ms={row['p50']:.2f}",
            f"{key}_p99_ms={row['p99']:.2f}",
        ]
    line += [f"{k}={v:.2f}" for k, v in ratios.items() if v is not None]
    line += [
        f"client_cpu_ms_max={max(r['client'] for r in rows.values()):.2f}",
        f"rounds={len(results['code'])}",
        f"requests={args.requests}",
        f"concurrency={args.concurrency}",
        "dot_hasher=salted_sha256",
        f"errors={errors}",
        f"cores={cores}",
    ]
    log(" ".join(line))
    return 1 if errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (max 50)")
    p.add_argument("--requests", type=int, default=500, help="requests per phase per round (max 20000)")
    p.add_argument("--concurrency", type=int, default=8, help="connections per server (and refresh chains)")
    p.add_argument("--warmup", type=int, default=50, help="untimed requests per server first")
    p.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/csbench_peers",
        help="loopback PostgreSQL; databases <name>_cs, <name>_dot and <name>_floor are created "
        "for the run and dropped after it",
    )
    p.add_argument("--drop-existing", action="store_true", help="drop those databases first if they exist")
    p.add_argument(
        "--redis-url", default="", help="REDIS_URL for Countersign (default: the product setting's)"
    )
    p.add_argument("--timeout", type=float, default=1200, help="global limit in seconds for the whole run")
    p.add_argument("--request-timeout", type=float, default=30, help="per-request timeout in seconds")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server logs)")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 50 or not 1 <= args.requests <= 20000 or not 1 <= args.concurrency <= 256:
        p.error("--rounds 1..50, --requests 1..20000, --concurrency 1..256")
    if args.warmup < args.concurrency:
        p.error("--warmup must be at least --concurrency (the warm-up starts the refresh chains)")
    if args.requests < args.concurrency:
        p.error("--requests must be at least --concurrency")
    check_database_url(p, "--database-url", args.database_url)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with Stack(prefix="peers", timeout=args.timeout, keep_tmp=args.keep_tmp) as stack:
        return run(args, stack)


if __name__ == "__main__":
    sys.exit(run_main(main))

#!/usr/bin/env python
"""Production-shaped load: many concurrent agents running the reference flow against two ASGI nodes
and two Celery workers, with thousands of idle inbox websockets open at the same time.

Starts its own stack on loopback: a fresh PostgreSQL database (created here, dropped at the end),
``migrate``, the scenario from a setup script, a private ``redis-server`` on a free port (or
``--redis-url``), two web processes (``_stack.start_web``, the production serving command, node A and
node B, the issuer is node A's URL; plus a websocket process per node if websockets are served apart) and two Celery workers (``config.celery:app``). Each server process gets
``DATABASE_POOL_SIZE`` (``--pool-size``): PostgreSQL's ``max_connections`` is shared with everything
else on the machine.

Phases:

1. Setup (untimed): each officer (``--agents-per-user`` agents each) signs in through the real login
   form; each agent exchanges its authorization code (PKCE) for a session token.
2. Idle websockets: ``--idle-ws`` authenticated ``/ws/approvals/`` connections, spread over both
   nodes and all officers' sessions, each reading its snapshot and then just listening. Memory per
   connection = (RSS of the processes serving websockets after opening them - RSS before) / count. They stay
   open through phase 3; one the server drops is reopened the way inbox.js does (250 ms * 2**retry)
   and counted.
3. Agents: ``--agents`` concurrent agents (node A or B alternately), ``--rounds`` reference flows each,
   back to back (a closed loop), or with ``--rate R`` started R per second in all by whichever agent
   is free (an open loop: every step's latency at that load rather than its share of a saturated
   queue; by Little's law a closed loop of 200 agents at 60 flows/s holds each flow ~3.3 s):
   (1) the catalog introspects the session token (``/o/introspect/``), (2) step-up request at
   ``/o/bc-authorize/`` (a unique ``ledger_entry`` per flow), (3) the officer's open inbox tab
   (one active websocket per officer) receives the prompt and the officer approves over HTTP
   (session cookie + CSRF token, ``/approvals/<id>/approve/``), (4) the agent collects the action
   token at ``/o/token/`` (CIBA grant), (5) the ledger redeems it at ``/o/redeem/``.

Printed: flows/s and HTTP requests/s, p50/p90/p99/max per step, CPU per flow and per request for
each process kind (web, ws, worker, redis) and for this load generator, errors (count and the first ones),
memory per websocket, idle websocket drops, database cross-checks (one action token per approved
flow, one redemption each), and one final ``key=value`` line for comparing runs.

Usage (from the project root)::

    .venv/bin/python bench/load.py
    .venv/bin/python bench/load.py --agents 200 --rounds 3 --idle-ws 2000
    .venv/bin/python bench/load.py --agents 200 --rounds 3 --idle-ws 2000 --rate 55
    .venv/bin/python bench/load.py --channel-socket-timeout 15   # servers with the channel-layer fix

Bounded: fixed counts, per-wait timeouts, a global ``--timeout`` with a watchdog. Everything it
starts (web, Celery, redis-server) runs in its own process group and is killed at the end; the
database is dropped. Nothing is asserted on timing; the exit status is non-zero on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import re
import resource
import secrets
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx
from _stack import (
    BENCH_LIMITS_ENV,
    LOOPBACK,
    ROOT,
    ConnectionMonitor,
    Errors,
    HttpResponse,
    LeanHttp,
    Stack,
    basic,
    celery_purge,
    check_database_url,
    dist,
    free_port,
    jwt_header,
    loadavg,
    log,
    open_idle_inbox,
    percentile,
    run_main,
    scalar,
    start_celery_worker,
    start_sealer,
    start_web,
    start_ws,
    wait_celery_ready,
)

REDIRECT_URI = "http://127.0.0.1:8199/callback"
CIBA = "urn:openid:params:grant-type:ciba"
CATALOG_AUDIENCE = "http://catalog.load"
LEDGER_AUDIENCE = "http://ledger.load"

# Runs with the bench environment: scopes, the catalog and the ledger, one agent registration per
# concurrent agent, one officer per --agents-per-user agents, and per agent a session grant with an
# authorization code (exchanged over HTTP once the servers are up).
SETUP_SCRIPT = r"""
import base64, hashlib, json, secrets, sys
from datetime import timedelta

import django
django.setup()

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from consent.keys import active_signing_key
from consent.models import AuthorizationCode, ScopePolicy
from consent.services import AuthContext, agent_create, grant_create, resource_server_create, scope_set

out_path, n_agents, per_user, redirect_uri, catalog_aud, ledger_aud = (
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
LIFETIME = 24 * 3600
SCOPES = ["catalog:read", "ledger:write"]

with transaction.atomic():
    scope_set(name="catalog:read", values={"audience": catalog_aud, "description": "Vendor catalog",
                                           "sensitivity": ScopePolicy.Sensitivity.STANDARD}, actor="bench")
    scope_set(name="ledger:write", values={
        "audience": ledger_aud, "description": "Financial ledger", "sensitivity": ScopePolicy.Sensitivity.STEP_UP,
        "authorization_details_types": ["ledger_entry"], "approval_window": 600, "action_token_ttl": 120,
    }, actor="bench")
    catalog, catalog_secret = resource_server_create(name="Catalog", audience=catalog_aud, actor="bench")
    ledger, ledger_secret = resource_server_create(name="Ledger", audience=ledger_aud, actor="bench")
active_signing_key()

users = []
for u in range((n_agents + per_user - 1) // per_user):
    password = secrets.token_urlsafe(18)
    user = get_user_model().objects.create_user(f"officer{u:03d}", password=password)
    users.append({"username": user.username, "password": password, "id": user.pk, "obj": user})

now = timezone.now()
auth = AuthContext(auth_time=now, amr=["pwd"])
agents = []
for i in range(n_agents):
    user = users[i // per_user]
    with transaction.atomic():
        agent, secret = agent_create(name=f"Procurement Agent {i:03d}", publisher="bench", scopes=SCOPES,
                                     redirect_uris=[redirect_uri], actor="bench")
        grant = grant_create(user=user["obj"], agent=agent, scopes=SCOPES, lifetime=LIFETIME, auth=auth,
                             consent_shown={"agent": {"name": agent.name}, "lifetime_seconds": LIFETIME})
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        code = secrets.token_urlsafe(24)
        AuthorizationCode.objects.create(application=agent, user=user["obj"], code=code,
                                         expires=now + timedelta(hours=1), redirect_uri=redirect_uri,
                                         scope=" ".join(SCOPES), code_challenge=challenge,
                                         code_challenge_method="S256", session_grant=grant)
    agents.append({"client_id": agent.client_id, "client_secret": secret, "user": i // per_user,
                   "code": code, "verifier": verifier})

for u in users:
    del u["obj"]
with open(out_path, "w") as fh:
    json.dump({"users": users, "agents": agents, "redirect_uri": redirect_uri,
               "catalog": [catalog.client_id, catalog_secret], "ledger": [ledger.client_id, ledger_secret]}, fh)
"""


class LockSampler:
    """Samples pg_stat_activity on the bench database: backends active, waiting on a lock, and waiting
    on a lock in a statement on the audit tables (appends take no shared lock: expect none)."""

    def __init__(self, database_url: str) -> None:
        self.database_url, self.name = database_url, urlparse(database_url).path.lstrip("/")
        self.samples: list[tuple[int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.database_url, autocommit=True, connect_timeout=10) as conn:
                while not self._stop.wait(0.2):
                    row = conn.execute(
                        "SELECT count(*) FILTER (WHERE state = 'active'), "
                        "count(*) FILTER (WHERE wait_event_type = 'Lock'), "
                        "count(*) FILTER (WHERE wait_event_type = 'Lock' AND query LIKE '%%audit_audit%%') "
                        "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                        [self.name],
                    ).fetchone()
                    assert row is not None
                    self.samples.append(tuple(row))
        except Exception as exc:  # noqa: BLE001 - a monitor must not break the run
            log(f"  (lock sampler stopped: {exc})")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> str:
        if not self.samples:
            return "no samples"
        n = len(self.samples)
        avg = [sum(s[k] for s in self.samples) / n for k in range(3)]
        peak = [max(s[k] for s in self.samples) for k in range(3)]
        return (
            f"{n} samples: active backends avg {avg[0]:.1f} (peak {peak[0]}), waiting on a lock avg {avg[1]:.1f} "
            f"(peak {peak[1]}), of which on audit tables avg {avg[2]:.1f} (peak {peak[2]})"
        )


def dist_ms(values_s: list[float]) -> str:
    return dist(values_s, digits=1)


def rss_kib(pgids: list[int]) -> int:
    """Resident set size (KiB) of every live process in these process groups (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) not in pgids:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total


def raise_fd_limit(need: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the servers started below
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- the stack ------------------------------------------------------------------------------------


class LoadRig:
    """Two nodes (a web process each, and a websocket process each if websockets are served apart),
    two Celery workers, Redis (private unless --redis-url), one PostgreSQL database."""

    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args, self.stack = args, stack
        self.ports = {"A": free_port(), "B": free_port()}
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        self.ws_urls = dict(self.urls)  # replaced by the websocket processes' URLs if there are any
        self.redis_url = args.redis_url
        self.settings_module = "config.settings"
        if args.channel_socket_timeout:
            # The fix proposed for the idle-websocket drops: a channel-layer socket timeout above
            # channels_redis' 5 s BZPOPMIN (redis-py 8 defaults socket_timeout to 5 s).
            (stack.tmp / "load_settings.py").write_text(
                "from config.settings import *  # noqa: F401,F403\n"
                "from config.settings import CHANNEL_LAYERS, REDIS_URL\n\n"
                "CHANNEL_LAYERS['default']['CONFIG']['hosts'] = [\n"
                f"    {{'address': REDIS_URL, 'socket_timeout': {args.channel_socket_timeout}}}]\n"
            )
            self.settings_module = "load_settings"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in (
            "DEBUG",
            "ALLOWED_HOSTS",
            "COUNTERSIGN_SIGNING_KEY_CACHE_SECONDS",
            "DJANGO_ALLOW_ASYNC_UNSAFE",
        ):
            env.pop(name, None)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": self.settings_module,
                "PYTHONPATH": os.pathsep.join(
                    [str(self.stack.tmp), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
                ),
                "DATABASE_URL": self.args.database_url,
                "DATABASE_POOL_SIZE": str(self.args.pool_size),
                "REDIS_URL": self.redis_url or "",
                "COUNTERSIGN_ISSUER": self.urls["A"],
                "COUNTERSIGN_VAR_DIR": str(self.stack.tmp),
                "SECRET_KEY": self.args.secret_key,
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
                **BENCH_LIMITS_ENV,
            }
        )
        return env

    def start(self) -> None:
        stack = self.stack
        if self.redis_url:
            celery_purge(stack, self.env())
        else:
            self.redis_url = stack.start_redis()
        webs, wss = {}, {}
        for name, port in self.ports.items():
            webs[name] = start_web(stack, f"web-{name}", port, self.env())
            ws = start_ws(stack, f"ws-{name}", free_port(), self.env())
            if ws is not None:
                wss[name] = ws
        workers = [
            start_celery_worker(
                stack,
                f"worker-{k}",
                self.env(),
                concurrency=self.args.worker_concurrency,
                hostname=f"load{k}-{self.ports['A']}@%h",
                extra=["--without-heartbeat"],
            )
            for k in (1, 2)
        ]
        start_sealer(stack, self.env())
        for web in webs.values():
            stack.wait_http(web, "/healthz", 120)
        for name, ws in wss.items():
            stack.wait_port(ws, 120)
            self.ws_urls[name] = ws.url
        for worker in workers:
            wait_celery_ready(stack, worker)
        log(
            f"  nodes A {self.urls['A']}  B {self.urls['B']}"
            + (f" (websockets on {self.ws_urls['A']}, {self.ws_urls['B']})" if wss else "")
            + f"; 2 Celery workers x {self.args.worker_concurrency}"
        )

    def ws_pgids(self) -> list[int]:
        """The processes holding the websockets: ws processes if there are any, else the web ones."""
        return self.stack.pgids(kind="ws") or self.stack.pgids(kind="web")


# --- clients ----------------------------------------------------------------------------------------


@dataclass
class Stats:
    steps: dict[str, list[float]] = field(
        default_factory=lambda: {
            k: [] for k in ("introspect", "bc_authorize", "prompt", "approve", "collect", "redeem", "flow")
        }
    )
    errors: Errors = field(default_factory=Errors)
    flows_ok: int = 0
    flows_failed: int = 0
    http_requests: int = 0
    skipped: int = 0
    retries: int = 0  # requests resent after the keep-alive race (see post())
    tokens: set[str] = field(default_factory=set)  # jti of every collected action token
    redeemed: Counter[str] = field(default_factory=Counter)


class Pacer:
    """An open loop (``--rate``): flow ``k`` is due ``k / rate`` seconds after the first, whichever agent
    is free takes the next one, and a flow that starts after it was due (every agent busy) is counted
    late with how late, so a server that falls behind shows in the figures instead of slowing the
    load down (a closed loop's coordinated omission)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0: float | None = None
        self.k = 0
        self.late: list[float] = []

    async def next(self) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        due = self.t0 + self.k / self.rate
        self.k += 1
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.005:
            self.late.append(now - due)


class WsBook:
    """Counts over the idle websockets."""

    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.drops = 0
        self.reconnects = 0
        self.failed_opens = 0
        self.first_drop: str = ""


if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection


async def ws_connect(ws_url: str, origin: str, cookie: str) -> ClientConnection:
    from websockets.asyncio.client import connect

    # Browsers offer permessage-deflate; so does this client (websockets' default).
    return await connect(
        ws_url.replace("http://", "ws://") + "/ws/approvals/",
        open_timeout=60,
        ping_interval=None,
        additional_headers={"Cookie": cookie, "Origin": origin},
        max_queue=None,
    )


async def idle_connection(
    ws_url: str, origin: str, cookie: str, book: WsBook, stop: asyncio.Event, opened: asyncio.Event
) -> None:
    """An idle inbox tab (``_stack.IdleInbox``): snapshot, then listen; reopen like inbox.js when the
    server drops it."""
    retry = 0
    while not stop.is_set():
        counted = False
        tab = None
        try:
            tab = await open_idle_inbox(
                ws_url, "/ws/approvals/", {"Cookie": cookie, "Origin": origin}, timeout=60
            )
            retry = 0
            book.open += 1
            counted = True
            if opened.is_set():
                book.reconnects += 1
            else:
                book.opened += 1
                opened.set()
            # Frames are read and dropped by the protocol (IdleInbox): nothing here runs per frame.
            # The run ends these tabs by cancelling their tasks.
            raise ConnectionError(await tab.lost)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused, or dropped by the server
            if counted:
                book.drops += 1
            elif not opened.is_set():
                book.failed_opens += 1
            book.first_drop = book.first_drop or f"{type(exc).__name__}: {exc}"[:300]
            opened.set()
        finally:
            if counted:
                book.open -= 1
            if tab is not None:
                tab.close()
        retry = min(retry + 1, 6)
        await asyncio.sleep(0.25 * 2**retry)


class Officer:
    """One officer: a session from the login form, one open inbox tab that reconnects like inbox.js,
    and approvals POSTed with the session cookie and the CSRF token."""

    def __init__(self, url: str, ws_url: str, username: str, password: str, args: argparse.Namespace) -> None:
        self.url, self.ws_url, self.username, self.password, self.args = url, ws_url, username, password, args
        self.sessionid = self.csrftoken = ""
        self.waiting: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self.http: LeanHttp | None = None
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def login(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.url, trust_env=False, timeout=self.args.request_timeout
        ) as http:
            page = await http.get("/accounts/login/", params={"next": "/approvals/"})
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
            if page.status_code != 200 or not token:
                raise RuntimeError(f"login page: HTTP {page.status_code}")
            done = await http.post(
                "/accounts/login/",
                data={
                    "username": self.username,
                    "password": self.password,
                    "next": "/approvals/",
                    "csrfmiddlewaretoken": token.group(1),
                },
                headers={"Origin": self.url},
            )
            if done.status_code != 302:
                raise RuntimeError(f"login refused: HTTP {done.status_code}")
            inbox = await http.get("/approvals/")
            if inbox.status_code != 200:
                raise RuntimeError(f"inbox: HTTP {inbox.status_code}")
            self.sessionid, self.csrftoken = http.cookies["sessionid"], http.cookies["csrftoken"]
        self.http = LeanHttp(
            self.url,
            timeout=self.args.request_timeout,
            headers={
                "Cookie": f"sessionid={self.sessionid}; csrftoken={self.csrftoken}",
                "X-CSRFToken": self.csrftoken,
                "Origin": self.url,
                "Referer": f"{self.url}/approvals/",
            },
        )

    @property
    def cookie(self) -> str:
        return f"sessionid={self.sessionid}"

    def expect(self, key: str) -> asyncio.Future[tuple[float, str]]:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        return fut

    def _saw(self, prompt: dict[str, Any]) -> None:
        details = prompt.get("authorization_details") or [{}]
        fut = self.waiting.get(details[0].get("purchase_order", ""))
        if fut is not None and not fut.done():
            fut.set_result((time.perf_counter(), prompt["id"]))

    async def open_tab(self) -> None:
        opened = asyncio.Event()
        self._task = asyncio.create_task(self._tab(opened))
        await asyncio.wait_for(opened.wait(), 120)

    async def _tab(self, opened: asyncio.Event) -> None:
        retry = 0
        while not self._stop.is_set():
            try:
                ws = await ws_connect(self.ws_url, self.url, self.cookie)
            except Exception:  # noqa: BLE001
                retry = min(retry + 1, 6)
                await asyncio.sleep(0.25 * 2**retry)
                continue
            retry = 0
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg["type"] == "snapshot":  # a reconnect replays what was missed meanwhile
                        for prompt in msg["prompts"]:
                            self._saw(prompt)
                        if opened.is_set():
                            self.reconnects += 1
                        opened.set()
                    elif msg["type"] == "upsert":
                        self._saw(msg["prompt"])
            except Exception:  # noqa: BLE001 - dropped: reconnect
                pass
            finally:
                try:
                    await ws.close()
                except Exception:  # noqa: BLE001
                    pass
            if self._stop.is_set():
                return
            retry = min(retry + 1, 6)
            await asyncio.sleep(0.25 * 2**retry)

    async def approve(self, approval_id: str, stats: Stats) -> HttpResponse:
        # The flash-message cookie in the answer is not kept: the Cookie header stays fixed.
        assert self.http is not None, "login() first"
        return await post(self.http, stats, f"/approvals/{approval_id}/approve/")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.http is not None:
            await self.http.aclose()


async def post(client: LeanHttp, stats: Stats, url: str, **kwargs: Any) -> HttpResponse:
    """One POST of the agents' phase (``_stack.LeanHttp``: cheap enough not to be what is measured;
    a request that met the keep-alive race is resent by it and counted)."""
    return await client.post(url, **kwargs)


async def exchange_codes(
    data: dict[str, Any], clients: dict[str, httpx.AsyncClient], stats: Stats, concurrency: int
) -> list[float]:
    latencies: list[float] = []
    queue = iter(enumerate(data["agents"]))

    async def worker() -> None:
        for i, agent in queue:
            client = clients["AB"[i % 2]]
            t0 = time.perf_counter()
            response = await client.post(
                "/o/token/",
                data={
                    "grant_type": "authorization_code",
                    "code": agent["code"],
                    "redirect_uri": data["redirect_uri"],
                    "code_verifier": agent["verifier"],
                },
                headers={"Authorization": basic(agent["client_id"], agent["client_secret"])},
            )
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                raise SystemExit(
                    f"code exchange for agent {i}: HTTP {response.status_code} {response.text[:300]}"
                )
            agent["session_token"] = response.json()["access_token"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def agent_flows(
    i: int,
    agent: dict[str, Any],
    officer: Officer,
    client: LeanHttp,
    data: dict[str, Any],
    args: argparse.Namespace,
    stats: Stats,
    pacer: Pacer | None = None,
) -> None:
    catalog = basic(*data["catalog"])
    ledger = basic(*data["ledger"])
    me = basic(agent["client_id"], agent["client_secret"])

    def fail(step: str, text: str) -> None:
        stats.flows_failed += 1
        stats.errors.note(f"agent {i} {step}: {text}")

    for r in range(args.rounds):
        if time.monotonic() > args.deadline - 30:
            stats.skipped += args.rounds - r
            return
        if pacer is not None:
            await pacer.next()
        t_flow = time.perf_counter()
        try:
            # (1) a resource server checks the session token
            t0 = time.perf_counter()
            response = await post(
                client,
                stats,
                "/o/introspect/",
                data={"token": agent["session_token"]},
                headers={"Authorization": catalog},
            )
            stats.http_requests += 1
            stats.steps["introspect"].append(time.perf_counter() - t0)
            if response.status_code != 200 or response.json().get("active") is not True:
                fail("introspect", f"HTTP {response.status_code} {response.text[:300]}")
                continue

            # (2) step-up request
            key = f"PO-LOAD-{i:03d}-{r:03d}"
            details = [
                {
                    "type": "ledger_entry",
                    "actions": ["append"],
                    "purchase_order": key,
                    "vendor": "Acme Office Supply",
                    "amount": f"{1000 + i}.{r % 100:02d}",
                    "currency": "USD",
                }
            ]
            arrived = officer.expect(key)
            t0 = time.perf_counter()
            response = await post(
                client,
                stats,
                "/o/bc-authorize/",
                headers={"Authorization": me},
                data={
                    "scope": "ledger:write",
                    "login_hint_token": agent["session_token"],
                    "authorization_details": json.dumps(details),
                    "binding_message": f"load flow {r}",
                },
            )
            stats.http_requests += 1
            stats.steps["bc_authorize"].append(time.perf_counter() - t0)
            if response.status_code != 200:
                officer.waiting.pop(key, None)
                fail("bc-authorize", f"HTTP {response.status_code} {response.text[:300]}")
                continue
            auth_req_id = response.json()["auth_req_id"]

            # (3) the prompt reaches the officer's open tab; the officer approves over HTTP
            try:
                t_prompt, approval_id = await asyncio.wait_for(arrived, args.wait_timeout)
            except TimeoutError:
                fail("prompt", f"no prompt in the officer's tab within {args.wait_timeout}s")
                continue
            finally:
                officer.waiting.pop(key, None)
            stats.steps["prompt"].append(t_prompt - t0)
            t0 = time.perf_counter()
            response = await officer.approve(approval_id, stats)
            stats.http_requests += 1
            stats.steps["approve"].append(time.perf_counter() - t0)
            if response.status_code != 302 or response.headers.get("location") != "/approvals/":
                fail("approve", f"HTTP {response.status_code} {response.text[:300]}")
                continue

            # (4) the agent collects its action token
            t0 = time.perf_counter()
            response = await post(
                client,
                stats,
                "/o/token/",
                headers={"Authorization": me},
                data={"grant_type": CIBA, "auth_req_id": auth_req_id},
            )
            stats.http_requests += 1
            stats.steps["collect"].append(time.perf_counter() - t0)
            if response.status_code != 200:
                fail("collect", f"HTTP {response.status_code} {response.text[:300]}")
                continue
            token = response.json()["access_token"]
            header = jwt_header(token)
            if header.get("typ") != "action+jwt":
                fail("collect", f"token typ {header.get('typ')!r}")
                continue
            payload = token.split(".")[1]
            jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
            stats.tokens.add(jti)

            # (5) the ledger redeems it before acting
            t0 = time.perf_counter()
            response = await post(
                client, stats, "/o/redeem/", headers={"Authorization": ledger}, data={"token": token}
            )
            stats.http_requests += 1
            stats.steps["redeem"].append(time.perf_counter() - t0)
            if response.status_code != 200:
                fail("redeem", f"HTTP {response.status_code} {response.text[:300]}")
                continue
            stats.redeemed[jti] += 1
            stats.steps["flow"].append(time.perf_counter() - t_flow)
            stats.flows_ok += 1
        except (OSError, EOFError, TimeoutError, ValueError) as exc:  # refused, reset, cut short, timed out
            fail("http", f"{type(exc).__name__}: {exc}")


def database_check(database_url: str, agents_started: float) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(database_url, connect_timeout=10) as conn:

        def q(sql: str) -> Any:
            return scalar(conn.execute(sql).fetchone())

        return {
            "approvals": q("SELECT count(*) FROM approvals_approvalrequest"),
            "redeemed_approvals": q(
                "SELECT count(*) FROM approvals_approvalrequest WHERE status = 'redeemed'"
            ),
            "action_tokens": q("SELECT count(*) FROM approvals_actiontoken"),
            "tokens_redeemed": q("SELECT count(*) FROM approvals_actiontoken WHERE redeemed_at IS NOT NULL"),
            "doubly_issued": q(
                "SELECT count(*) FROM (SELECT detail->>'approval_id' FROM audit_auditevent WHERE "
                "event = 'action_token.issued' GROUP BY 1 HAVING count(*) > 1) d"
            ),
            "doubly_delivered": q(
                "SELECT count(*) FROM (SELECT detail->>'approval_id' FROM audit_auditevent WHERE "
                "event = 'approval.delivered' GROUP BY 1 HAVING count(*) > 1) d"
            ),
            "undelivered": q("SELECT count(*) FROM approvals_approvalrequest WHERE delivered_at IS NULL"),
            # Server side of request -> prompt: the request's row created -> the worker's push recorded.
            "delivery_lag_ms": [
                r[0]
                for r in conn.execute(
                    "SELECT extract(epoch FROM delivered_at - created) * 1000 FROM approvals_approvalrequest"
                    " WHERE delivered_at IS NOT NULL ORDER BY 1"
                ).fetchall()
            ],
            # Audit seal lag (the sealer's goal: p99 under 2 s): event written -> linked into the chain, for
            # the events of the agents' phase (the setup's were written before the sealer started).
            "seal_lag_ms": [
                r[0]
                for r in conn.execute(
                    "SELECT extract(epoch FROM l.sealed_at - e.occurred_at) * 1000 FROM audit_auditlink l"
                    " JOIN audit_auditevent e ON e.id = l.event_id WHERE e.occurred_at >= to_timestamp(%s)"
                    " ORDER BY 1",
                    [agents_started],
                ).fetchall()
            ],
            # Where the longest waits were: the events with the largest lag, and when they were written.
            "seal_lag_worst": conn.execute(
                "SELECT e.event, round(extract(epoch FROM l.sealed_at - e.occurred_at) * 1000),"
                " round(extract(epoch FROM e.occurred_at - to_timestamp(%s)) * 1000)"
                " FROM audit_auditlink l JOIN audit_auditevent e ON e.id = l.event_id"
                " WHERE e.occurred_at >= to_timestamp(%s)"
                " ORDER BY l.sealed_at - e.occurred_at DESC LIMIT 5",
                [agents_started, agents_started],
            ).fetchall(),
            "unsealed": q(
                "SELECT count(*) FROM audit_auditevent e WHERE NOT EXISTS"
                " (SELECT 1 FROM audit_auditlink l WHERE l.event_id = e.id)"
            ),
        }


async def run_load(rig: LoadRig, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    stack = rig.stack
    out: dict[str, Any] = {"stats": Stats(), "book": WsBook()}
    stats, book = out["stats"], out["book"]
    limits = httpx.Limits(
        max_connections=args.agents, max_keepalive_connections=args.agents, keepalive_expiry=1.0
    )
    clients = {
        name: httpx.AsyncClient(base_url=url, trust_env=False, timeout=args.request_timeout, limits=limits)
        for name, url in rig.urls.items()
    }  # setup only; the agents' phase uses LeanHttp
    lean = {name: LeanHttp(url, timeout=args.request_timeout) for name, url in rig.urls.items()}
    officers: list[Officer] = []
    idle_tasks: list[asyncio.Task[None]] = []
    stop_idle = asyncio.Event()
    try:
        # 1. officers sign in (node by index), agents exchange their codes
        t0 = time.perf_counter()
        officers = [
            Officer(rig.urls["AB"[u % 2]], rig.ws_urls["AB"[u % 2]], user["username"], user["password"], args)
            for u, user in enumerate(data["users"])
        ]
        sem = asyncio.Semaphore(4)

        async def login(o: Officer) -> None:
            async with sem:
                await o.login()

        await asyncio.gather(*(login(o) for o in officers))
        log(f"  {len(officers)} officers signed in through the login form: {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        out["exchange"] = await exchange_codes(data, clients, stats, min(args.agents, 50))
        log(
            f"  {len(data['agents'])} authorization codes exchanged: {time.perf_counter() - t0:.1f}s "
            f"({dist_ms(out['exchange'])})"
        )

        # warm the websocket path of both nodes, then the baseline
        for node, url in rig.urls.items():
            for o in officers[:5]:
                ws = await ws_connect(rig.ws_urls[node], url, o.cookie)
                await ws.recv()
                await ws.close()
        await asyncio.sleep(2)
        out["rss_before"] = rss_kib(rig.ws_pgids())

        # 2. idle websockets, spread over both nodes and every officer's session
        log(f"\nphase 2: opening {args.idle_ws} idle websockets; load average {loadavg()}")
        t0 = time.perf_counter()
        opened_events = []
        batch = asyncio.Semaphore(args.ws_open_concurrency)

        async def open_one(k: int) -> None:
            async with batch:
                ev = asyncio.Event()
                node = "AB"[k % 2]
                task = asyncio.create_task(
                    idle_connection(
                        rig.ws_urls[node],
                        rig.urls[node],
                        officers[k % len(officers)].cookie,
                        book,
                        stop_idle,
                        ev,
                    )
                )
                idle_tasks.append(task)
                opened_events.append(ev)
                await asyncio.wait_for(ev.wait(), 120)

        await asyncio.gather(*(open_one(k) for k in range(args.idle_ws)), return_exceptions=True)
        out["ws_open_wall"] = time.perf_counter() - t0
        await asyncio.sleep(3)  # settle
        out["rss_after"] = rss_kib(rig.ws_pgids())
        out["ws_open_at_rss"] = book.open
        log(
            f"  opened {book.opened} (failed first opens {book.failed_opens}) in {out['ws_open_wall']:.1f}s; "
            f"open now {book.open}, drops so far {book.drops}"
        )

        # 3. the agents
        for o in officers:
            await o.open_tab()
        log(
            f"\nphase 3: {args.agents} concurrent agents x {args.rounds} reference flows, {book.open} idle "
            f"websockets open; load average {loadavg()}"
        )
        cpu0 = stack.cpu_sample()
        drops0 = book.drops
        sampler = LockSampler(args.database_url)
        sampler.start()
        t0 = time.perf_counter()
        out["agents_started"] = time.time()  # wall clock, for the server-side figures of this phase
        pacer = out["pacer"] = Pacer(args.rate) if args.rate else None
        await asyncio.gather(
            *(
                agent_flows(i, agent, officers[agent["user"]], lean["AB"[i % 2]], data, args, stats, pacer)
                for i, agent in enumerate(data["agents"])
            )
        )
        out["wall"] = time.perf_counter() - t0
        stats.retries = sum(c.resent for c in lean.values()) + sum(
            o.http.resent for o in officers if o.http is not None
        )
        sampler.stop()
        out["locks"] = sampler.summary()
        out["cpu"] = stack.cpu_usage(cpu0, stack.cpu_sample())
        out["drops_during_load"] = book.drops - drops0
        out["ws_open_end"] = book.open
        out["officer_reconnects"] = sum(o.reconnects for o in officers)
        out["rss_end"] = rss_kib(rig.ws_pgids())
        log(f"  done in {out['wall']:.1f}s; load average {loadavg()}")
    finally:
        stop_idle.set()
        for task in idle_tasks:
            task.cancel()
        await asyncio.gather(*idle_tasks, return_exceptions=True)
        for o in officers:
            await o.close()
        for client in clients.values():
            await client.aclose()
        for lean_client in lean.values():
            await lean_client.aclose()
    return out


def run(args: argparse.Namespace, stack: Stack, limit: tuple[int, int]) -> int:
    rig = LoadRig(args, stack)
    cores = os.cpu_count() or 1
    monitor: ConnectionMonitor | None = None
    out: dict[str, Any] = {}
    db: dict[str, Any] = {}
    logs = ""
    try:
        log(
            f"setup (cores={cores}, open files limit {limit[0]}, tmp={stack.tmp}, settings {rig.settings_module})"
        )
        stack.create_database(args.database_url, drop_existing=args.drop_existing)
        stack.run_step([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], rig.env(), "migrate")
        data_path = stack.tmp / "setup.json"
        stack.run_step(
            [
                sys.executable,
                "-c",
                SETUP_SCRIPT,
                str(data_path),
                str(args.agents),
                str(args.agents_per_user),
                REDIRECT_URI,
                CATALOG_AUDIENCE,
                LEDGER_AUDIENCE,
            ],
            rig.env(),
            f"scenario: {args.agents} agents, {math.ceil(args.agents / args.agents_per_user)} officers",
        )
        stack.analyze(args.database_url)
        data = json.loads(data_path.read_text())
        rig.start()
        monitor = ConnectionMonitor(args.database_url)
        monitor.start()
        monitor.phase = "load"
        log("\nphase 1: sign-ins and code exchanges")
        out = asyncio.run(run_load(rig, data, args))
        monitor.stop()
        db = database_check(args.database_url, out["agents_started"])
        logs = "\n".join(f"--- {n} (tail)\n{stack.log_tail(n, 3000)}" for n in list(stack.procs))
    finally:
        if monitor is not None:
            monitor.stop()
        stack.stop_all()

    stats: Stats = out["stats"]
    book: WsBook = out["book"]
    wall = out["wall"]
    log(
        f"\nPostgreSQL backends on the bench database, peak: {monitor.peak.get('load', '?')} "
        f"(pool {args.pool_size} per process, 2 web, 2 ws and 2 worker processes, {args.worker_concurrency} "
        f"task threads each)"
    )
    log("\n[agents: reference flow]")
    log(
        f"  flows             {stats.flows_ok} ok, {stats.flows_failed} failed"
        + (f", {stats.skipped} not started (deadline)" if stats.skipped else "")
        + f"  ({args.agents} agents x {args.rounds} rounds)"
    )
    log(f"  wall              {wall:.1f} s")
    pacer = out.get("pacer")
    if pacer is not None:
        log(
            f"  offered           {pacer.rate:g} flows/s (open loop); started late: {len(pacer.late)} of "
            f"{pacer.k} flows, {dist_ms(pacer.late)}"
        )
    else:
        log("  offered           closed loop: each agent starts its next flow when the last one ends")
    log(
        f"  throughput        {stats.flows_ok / wall:.1f} flows/s, {stats.http_requests / wall:.1f} HTTP requests/s "
        f"(5 per flow)"
    )
    for name, label in (
        ("introspect", "(1) introspect session token"),
        ("bc_authorize", "(2) POST /o/bc-authorize/"),
        ("prompt", "    request -> prompt in tab"),
        ("approve", "(3) officer approves (HTTP)"),
        ("collect", "(4) collect at /o/token/"),
        ("redeem", "(5) redeem at /o/redeem/"),
        ("flow", "    whole flow"),
    ):
        log(f"  {label:32s} {dist_ms(stats.steps[name])}")
    log(
        f"  errors            {stats.errors.count}"
        + (f"  (requests resent after a keep-alive close: {stats.retries})" if stats.retries else "")
    )
    for sample in stats.errors.samples:
        log(f"    {sample}")
    cpu = out["cpu"]
    if stats.flows_ok:
        log(f"  CPU per flow      {cpu.line(stats.flows_ok, 'flow')}")
        log(f"  CPU per request   {cpu.line(stats.http_requests, 'HTTP request')}")
    log(f"  machine           {cpu.machine_line(cores)} (agents' phase)")
    log(f"  PostgreSQL        {out['locks']}")

    n_ws = out["ws_open_at_rss"]
    per_ws = (out["rss_after"] - out["rss_before"]) / n_ws if n_ws else 0.0
    log("\n[idle websockets]")
    log(
        f"  opened            {book.opened} of {args.idle_ws} in {out['ws_open_wall']:.1f}s "
        f"({book.opened / out['ws_open_wall']:.0f}/s), first-open failures {book.failed_opens}"
    )
    log(
        f"  websocket RSS     before {out['rss_before'] / 1024:.1f} MiB, with {n_ws} open "
        f"{out['rss_after'] / 1024:.1f} MiB, at the end {out['rss_end'] / 1024:.1f} MiB (both nodes' processes "
        f"serving websockets)"
    )
    log(f"  memory per ws     {per_ws:.1f} KiB")
    log(
        f"  dropped by server {book.drops} in total, {out['drops_during_load']} during the agents' phase "
        f"({out['drops_during_load'] / wall:.2f}/s); reopened {book.reconnects}; open at the end {out['ws_open_end']}"
    )
    if book.first_drop:
        log(f"    first drop: {book.first_drop}")
    log(f"  officers' active tabs reconnected {out['officer_reconnects']} times during the run")

    log("\n[database]")
    log(
        f"  approvals {db['approvals']}, redeemed {db['redeemed_approvals']}; action tokens {db['action_tokens']}, "
        f"redeemed {db['tokens_redeemed']}; approvals issued twice {db['doubly_issued']}, delivered twice "
        f"{db['doubly_delivered']}, never delivered {db['undelivered']}"
    )
    doubles = sum(1 for n in stats.redeemed.values() if n > 1) + db["doubly_issued"]
    consistent = db["tokens_redeemed"] == stats.flows_ok == len(stats.tokens) == db["redeemed_approvals"]
    log(f"  responses and rows agree: {'yes' if consistent else 'NO'}")
    lag = [float(x) for x in db["delivery_lag_ms"]]
    log(
        f"  request row created -> push recorded by the worker (server clocks): n={len(lag)}  "
        f"p50 {percentile(lag, 50):.1f}  p90 {percentile(lag, 90):.1f}  p99 {percentile(lag, 99):.1f} ms"
    )
    seal = [float(x) for x in db["seal_lag_ms"]]
    log(
        f"  audit event written during the agents' phase -> sealed into the chain: n={len(seal)}  p50 {percentile(seal, 50):.1f}  "
        f"p99 {percentile(seal, 99):.1f}  max {max(seal, default=0):.1f} ms; not yet sealed at the end "
        f"{db['unsealed']}"
    )
    log(
        "    longest: "
        + ", ".join(
            f"{ev} {lag_ms:.0f} ms (written at +{at_ms / 1000:.1f} s)"
            for ev, lag_ms, at_ms in db["seal_lag_worst"]
        )
    )

    failed = bool(stats.errors.count or stats.skipped or doubles or not consistent)
    if failed:
        log("\n" + logs)
    lat = {k: sorted(x * 1000 for x in v) for k, v in stats.steps.items()}
    log("")
    log(
        f"load flows_per_s={stats.flows_ok / wall:.1f} http_rps={stats.http_requests / wall:.1f} "
        f"flows={stats.flows_ok} errors={stats.errors.count} agents={args.agents} offered_rate={args.rate:g} "
        + " ".join(
            f"{k}_p50_ms={percentile(lat[k], 50):.1f} {k}_p99_ms={percentile(lat[k], 99):.1f}"
            for k in ("introspect", "bc_authorize", "prompt", "approve", "collect", "redeem", "flow")
        )
        + f" idle_ws={n_ws} kib_per_ws={per_ws:.1f} ws_drops_per_s={out['drops_during_load'] / wall:.2f} "
        f"double_tokens={doubles} delivery_lag_p50_ms={percentile(lag, 50):.1f} "
        f"delivery_lag_p99_ms={percentile(lag, 99):.1f} seal_lag_p50_ms={percentile(seal, 50):.1f} "
        f"seal_lag_p99_ms={percentile(seal, 99):.1f} "
        + "".join(
            f"{k}_cpu_ms_per_flow={v:.2f} " for k, v in cpu.per(stats.flows_ok).items() if v is not None
        )
        + f"client_cpu_ms_per_flow={1000 * cpu.client / stats.flows_ok if stats.flows_ok else 0:.2f} "
        f"cores={cores}"
    )
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--agents", type=int, default=200, help="concurrent agents (max 1000)")
    p.add_argument("--rounds", type=int, default=3, help="reference flows per agent (max 50)")
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        help="open loop: start this many flows per second in all, each by the next free agent (latency at a "
        "given load); 0 = closed loop, every agent back to back (the most the servers sustain)",
    )
    p.add_argument(
        "--agents-per-user",
        type=int,
        default=5,
        help="agents per officer (the product allows 10 pending prompts per user)",
    )
    p.add_argument("--idle-ws", type=int, default=2000, help="idle authenticated websockets (max 20000)")
    p.add_argument("--ws-open-concurrency", type=int, default=50, help="websockets being opened at once")
    p.add_argument(
        "--worker-concurrency",
        type=int,
        default=4,
        help="tasks at once per Celery worker (2 workers; threads, CELERY_WORKER_POOL)",
    )
    p.add_argument("--pool-size", type=int, default=10, help="DATABASE_POOL_SIZE for every server process")
    p.add_argument(
        "--channel-socket-timeout",
        type=float,
        default=0,
        help="run the servers with the channel layer's Redis socket_timeout set to this (the fix "
        "for idle websocket drops); 0 = product settings unchanged",
    )
    p.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/countersign_bench_load",
        help="loopback PostgreSQL; this database is created for the run and dropped after it",
    )
    p.add_argument(
        "--drop-existing", action="store_true", help="drop the database first if it already exists"
    )
    p.add_argument(
        "--redis-url",
        default="",
        help="use this loopback Redis (its countersign queue is purged) instead of a private redis-server",
    )
    p.add_argument("--timeout", type=float, default=900, help="global limit in seconds for the whole run")
    p.add_argument("--wait-timeout", type=float, default=120, help="longest wait for one prompt (seconds)")
    p.add_argument("--request-timeout", type=float, default=60, help="per-request timeout in seconds")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server and worker logs)")
    args = p.parse_args(argv)
    if not 1 <= args.agents <= 1000 or not 1 <= args.rounds <= 50 or not 0 <= args.idle_ws <= 20000:
        p.error("--agents 1..1000, --rounds 1..50, --idle-ws 0..20000")
    if not 0 <= args.rate <= 1000:
        p.error("--rate must be 0 (closed loop) .. 1000 flows/s")
    if not 1 <= args.agents_per_user <= 10:
        p.error("--agents-per-user must be 1..10 (MAX_PENDING_PER_USER is 10)")
    if args.idle_ws == 0:
        p.error("--idle-ws must be at least 1 (memory per connection is measured)")
    if args.redis_url and urlparse(args.redis_url).hostname not in LOOPBACK:
        p.error("--redis-url must point at a loopback host (127.0.0.1, localhost, ::1)")
    check_database_url(p, "--database-url", args.database_url)
    args.secret_key = secrets.token_urlsafe(50)
    args.deadline = time.monotonic() + args.timeout
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_fd_limit(args.idle_ws * 2 + 2000)
    with Stack(prefix="load", timeout=args.timeout, keep_tmp=args.keep_tmp, grace=60) as stack:
        args.deadline = stack.deadline
        return run(args, stack, limit)


if __name__ == "__main__":
    sys.exit(run_main(main))

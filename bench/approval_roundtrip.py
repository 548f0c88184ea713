#!/usr/bin/env python
"""Step-up approval round trip and redemption race, over real HTTP and a real websocket on loopback.

Starts its own stack: a fresh PostgreSQL database (created and dropped here), ``migrate``,
scenario rows from a setup script, then the web process (``_stack.start_web``, the production
serving command; a websocket process too if websockets are served apart) and a Celery
worker (``config.celery:app``, Redis broker and channel layer on ``--redis-url``).

Phase 1, approval round trip (``--rounds`` sequential rounds, after ``--warmup`` untimed ones):

  (a) request -> prompt: the agent POSTs ``/o/bc-authorize/`` (CIBA, a unique
      ``authorization_details`` each round) until the officer's websocket (``/ws/approvals/``,
      session cookie from the real login form) receives the ``upsert`` for it; the path is
      HTTP -> DB commit -> Celery task -> channels_redis group_send -> websocket.
  (b) approve -> token: the officer POSTs ``/approvals/<id>/approve/`` (CSRF token in
      X-CSRFToken, Origin of the issuer); right after the 302 the agent polls the token
      endpoint (``urn:openid:params:grant-type:ciba``) and holds the action token. A decided
      request answers at once; ``slow_down`` only limits polls of a pending one.
  Each collected token is then redeemed once by the ledger (timed separately, not in (b)).

Phase 2, redemption race: ``--tokens`` action tokens are minted directly in the database by the
setup script (approval rows in state ``issued`` + ``ActionToken`` rows + JWTs from
``approvals.tokens.action_claims``/``mint``); each token is then POSTed to ``/o/redeem/`` by
``--redeemers`` concurrent redeemers at once, ``--race-concurrency`` tokens in flight. wrk
(Debian's package) drives the race when it is installed (``--race-loadgen wrk``): a Python load
generator costs more CPU per attempt than the server, on the same two cores, and would measure
itself. ``--race-loadgen httpx`` keeps the Python redeemers. Double redemptions are counted from the responses and from the database (redeemed rows,
``action_token.redeemed`` audit events per jti); they must be 0. ``--web-workers 2`` serves both
phases from two web processes on the one port (granian workers): the two-core redemption figure,
where the twins of an attempt often land in the other process and are decided by the database.

Usage (from the project root)::

    .venv/bin/python bench/approval_roundtrip.py
    .venv/bin/python bench/approval_roundtrip.py --rounds 100 --tokens 5000 --redeemers 4
    .venv/bin/python bench/approval_roundtrip.py --rounds 30 --tokens 6000 --web-workers 2

Printed: latency percentiles per leg, CPU per round and per redemption attempt for each process
kind (web, ws, worker) and for this load generator, and a final ``key=value`` line.

Bounded: fixed counts, per-wait timeouts, a global ``--timeout`` with a watchdog. The processes
it starts are always stopped (each its own process group) and the database is dropped. Nothing
is asserted on timing; the exit status is non-zero on errors or on any double redemption.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
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
    CpuUsage,
    Errors,
    Proc,
    Stack,
    basic,
    celery_purge,
    check_database_url,
    dist,
    free_port,
    jwt_header,
    loadavg,
    log,
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
LEDGER_AUDIENCE = "http://ledger.bench"

# Runs with the bench environment (DATABASE_URL, COUNTERSIGN_ISSUER, ...): the reference scenario's
# records, one session grant with an authorization code (exchanged over HTTP once the server is
# up), and a second grant with N approvals already in state ``issued`` and their action tokens.
SETUP_SCRIPT = r"""
import base64, hashlib, json, secrets, sys
from datetime import timedelta

import django
django.setup()

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from approvals import rar
from approvals.models import ActionToken, ApprovalRequest
from approvals.tokens import action_claims, mint
from consent.tokens import token_checksum
from consent.keys import active_signing_key
from consent.models import AuthorizationCode, ScopePolicy
from consent.services import AuthContext, agent_create, grant_create, resource_server_create, scope_set

out_path, n_tokens, token_ttl, redirect_uri, audience = (
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
LIFETIME = 24 * 3600
password = secrets.token_urlsafe(18)

with transaction.atomic():
    scope_set(name="catalog:read", values={"audience": "http://catalog.bench", "description": "Vendor catalog",
                                           "sensitivity": ScopePolicy.Sensitivity.STANDARD}, actor="bench")
    scope_set(name="ledger:write", values={
        "audience": audience, "description": "Financial ledger", "sensitivity": ScopePolicy.Sensitivity.STEP_UP,
        "authorization_details_types": ["ledger_entry"], "approval_window": 600, "action_token_ttl": 120,
    }, actor="bench")
    ledger, ledger_secret = resource_server_create(name="Ledger", audience=audience, actor="bench")
    agent, agent_secret = agent_create(name="Procurement Agent", publisher="bench",
                                       scopes=["catalog:read", "ledger:write"], redirect_uris=[redirect_uri],
                                       actor="bench")
    user = get_user_model().objects.create_user("officer", password=password)
active_signing_key()  # created now, not by the first timed request

now = timezone.now()
auth = AuthContext(auth_time=now, amr=["pwd"])
shown = {"agent": {"name": agent.name}, "lifetime_seconds": LIFETIME}
scopes = ["catalog:read", "ledger:write"]

# Phase 1: one consent; the agent exchanges this code for its session token over HTTP.
grant = grant_create(user=user, agent=agent, scopes=scopes, lifetime=LIFETIME, auth=auth, consent_shown=shown)
verifier = secrets.token_urlsafe(48)
challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
code = secrets.token_urlsafe(24)
AuthorizationCode.objects.create(application=agent, user=user, code=code, expires=now + timedelta(hours=1),
                                 redirect_uri=redirect_uri, scope="catalog:read", code_challenge=challenge,
                                 code_challenge_method="S256", session_grant=grant)

# Phase 2: N approved-and-collected actions, as approval_collect would leave them.
race_grant = grant_create(user=user, agent=agent, scopes=scopes, lifetime=LIFETIME, auth=auth, consent_shown=shown)
approvals, tokens, rows = [], [], []
decision_auth = {"auth_time": int(now.timestamp()), "amr": ["pwd"], "acr": ""}
for i in range(n_tokens):
    details = [{"type": "ledger_entry", "actions": ["append"], "purchase_order": f"PO-RACE-{i:06d}",
                "vendor": "Acme Office Supply", "amount": f"{100000 + i}.00", "currency": "USD"}]
    approvals.append(ApprovalRequest(
        auth_req_id_hash=hashlib.sha256(secrets.token_bytes(32)).hexdigest(), grant=race_grant, user=user,
        agent=agent, scope="ledger:write", authorization_details=details, action_hash=rar.action_hash(details),
        headline=rar.headline(details, system="Financial ledger"), created=now,
        expires_at=now + timedelta(seconds=600), status=ApprovalRequest.Status.ISSUED, decided_at=now,
        decided_by=user, decision_method="bench", decision_auth=decision_auth))
with transaction.atomic():
    ApprovalRequest.objects.bulk_create(approvals, batch_size=1000)
    for approval in approvals:
        claims = action_claims(approval=approval, audience=audience, ttl=token_ttl)
        token = mint(claims)  # recorded with its digest, as approval collection records it
        rows.append(ActionToken(jti=claims["jti"], token_checksum=token_checksum(token), approval=approval,
                                issued_at=now, expires_at=now + timedelta(seconds=token_ttl)))
        tokens.append([claims["jti"], token])
    ActionToken.objects.bulk_create(rows, batch_size=1000)

with open(out_path, "w") as fh:
    json.dump({"client_id": agent.client_id, "client_secret": agent_secret,
               "ledger_client_id": ledger.client_id, "ledger_secret": ledger_secret,
               "username": "officer", "password": password, "user_id": user.pk,
               "code": code, "verifier": verifier, "redirect_uri": redirect_uri,
               "race_grant_id": str(race_grant.pk), "race_tokens": tokens}, fh)
"""

# --- phase 1: approval round trip -------------------------------------------------------------


if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

Arrival = tuple[float, dict[str, Any]]  # when a prompt reached the inbox, and the prompt


class Inbox:
    """The officer's inbox tab: one websocket, a reader task that timestamps each prompt's arrival."""

    def __init__(self, url: str, cookie: str, origin: str) -> None:
        self.url, self.cookie, self.origin = url, cookie, origin
        self.waiting: dict[str, asyncio.Future[Arrival]] = {}
        self.removes = 0
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(
            self.url,
            additional_headers={"Cookie": self.cookie, "Origin": self.origin},
            open_timeout=10,
            max_queue=None,
        )
        first = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        if first.get("type") != "snapshot":
            raise RuntimeError(f"expected a snapshot on connect, got {first}")
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None, "open() first"
        async for raw in self.ws:
            now = time.perf_counter()
            msg = json.loads(raw)
            if msg.get("type") == "upsert":
                details = msg["prompt"].get("authorization_details") or [{}]
                fut = self.waiting.get(details[0].get("purchase_order", ""))
                if fut is not None and not fut.done():
                    fut.set_result((now, msg["prompt"]))
            elif msg.get("type") == "remove":
                self.removes += 1

    def expect(self, key: str) -> asyncio.Future[Arrival]:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        return fut

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            await self.ws.close()


@dataclass
class RoundTrip:
    to_prompt: list[float] = field(default_factory=list)
    bc_authorize_http: list[float] = field(default_factory=list)
    approve_to_token: list[float] = field(default_factory=list)
    approve_http: list[float] = field(default_factory=list)
    collect_http: list[float] = field(default_factory=list)
    redeem_http: list[float] = field(default_factory=list)
    errors: Errors = field(default_factory=Errors)
    rounds: int = 0
    wall: float = 0.0
    cpu: CpuUsage | None = None  # timed rounds only


async def officer_login(base: str, username: str, password: str) -> tuple[str, str]:
    """Sign in through the real login form; returns (sessionid, csrftoken) for the inbox."""
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http:
        page = await http.get("/accounts/login/", params={"next": "/approvals/"})
        match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        if page.status_code != 200 or not match:
            raise RuntimeError(f"login page: HTTP {page.status_code}")
        done = await http.post(
            "/accounts/login/",
            data={
                "username": username,
                "password": password,
                "next": "/approvals/",
                "csrfmiddlewaretoken": match.group(1),
            },
            headers={"Origin": base, "Referer": f"{base}/accounts/login/"},
        )
        if done.status_code != 302 or done.headers.get("location") != "/approvals/":
            raise RuntimeError(f"login refused: HTTP {done.status_code} {done.text[:300]}")
        inbox = await http.get("/approvals/")  # the token rotates at login: take the page's one
        if inbox.status_code != 200 or "Nothing waiting" not in inbox.text:
            raise RuntimeError(f"inbox: HTTP {inbox.status_code}")
        return http.cookies["sessionid"], http.cookies["csrftoken"]


async def approval_roundtrip(
    stack: Stack, base: str, ws_base: str, data: dict[str, Any], args: argparse.Namespace
) -> RoundTrip:
    result = RoundTrip()
    sessionid, csrftoken = await officer_login(base, data["username"], data["password"])
    agent = httpx.AsyncClient(
        base_url=base,
        trust_env=False,
        timeout=args.request_timeout,
        headers={"Authorization": basic(data["client_id"], data["client_secret"])},
    )
    ledger = httpx.AsyncClient(
        base_url=base,
        trust_env=False,
        timeout=args.request_timeout,
        headers={"Authorization": basic(data["ledger_client_id"], data["ledger_secret"])},
    )
    officer = httpx.AsyncClient(
        base_url=base,
        trust_env=False,
        timeout=args.request_timeout,
        headers={
            "Cookie": f"sessionid={sessionid}; csrftoken={csrftoken}",
            "X-CSRFToken": csrftoken,
            "Origin": base,
            "Referer": f"{base}/approvals/",
        },
    )
    inbox = Inbox(ws_base.replace("http://", "ws://") + "/ws/approvals/", f"sessionid={sessionid}", base)
    try:
        response = await agent.post(
            "/o/token/",
            data={
                "grant_type": "authorization_code",
                "code": data["code"],
                "redirect_uri": data["redirect_uri"],
                "code_verifier": data["verifier"],
            },
        )
        if response.status_code != 200:
            raise RuntimeError(f"code exchange: HTTP {response.status_code} {response.text[:300]}")
        session_token = response.json()["access_token"]
        await inbox.open()

        total = args.warmup + args.rounds
        cpu_start = stack.cpu_sample()
        for i in range(total):
            if time.monotonic() > args.deadline:
                result.errors.note(f"global deadline reached after {i} rounds")
                break
            timed = i >= args.warmup
            if i == args.warmup:
                cpu_start = stack.cpu_sample()
            key = f"PO-BENCH-{i:06d}"
            details = [
                {
                    "type": "ledger_entry",
                    "actions": ["append"],
                    "purchase_order": key,
                    "vendor": "Acme Office Supply",
                    "amount": f"{1000 + i}.{i % 100:02d}",
                    "currency": "USD",
                }
            ]
            arrived = inbox.expect(key)

            # (a) request -> prompt on the websocket
            t0 = time.perf_counter()
            response = await agent.post(
                "/o/bc-authorize/",
                data={
                    "scope": "ledger:write",
                    "login_hint_token": session_token,
                    "authorization_details": json.dumps(details),
                    "binding_message": f"bench round {i}",
                },
            )
            t_http = time.perf_counter()
            if response.status_code != 200:
                result.errors.note(
                    f"round {i} bc-authorize: HTTP {response.status_code} {response.text[:300]}"
                )
                inbox.waiting.pop(key, None)
                continue
            auth_req_id = response.json()["auth_req_id"]
            try:
                t_prompt, prompt = await asyncio.wait_for(arrived, args.wait_timeout)
            except TimeoutError:
                result.errors.note(f"round {i}: no prompt on the websocket within {args.wait_timeout}s")
                continue
            finally:
                inbox.waiting.pop(key, None)

            # (b) approve -> the agent holds the action token
            t1 = time.perf_counter()
            response = await officer.post(f"/approvals/{prompt['id']}/approve/")
            t_approved = time.perf_counter()
            officer.cookies.clear()  # drop the flash-message cookie; the Cookie header stays fixed
            if response.status_code != 302:
                result.errors.note(f"round {i} approve: HTTP {response.status_code} {response.text[:300]}")
                continue
            response = await agent.post("/o/token/", data={"grant_type": CIBA, "auth_req_id": auth_req_id})
            t2 = time.perf_counter()
            if response.status_code != 200:
                result.errors.note(f"round {i} collect: HTTP {response.status_code} {response.text[:300]}")
                continue
            token = response.json()["access_token"]
            if jwt_header(token).get("typ") != "action+jwt":
                result.errors.note(f"round {i}: token typ {jwt_header(token).get('typ')!r}")

            # the ledger redeems it once (not part of either leg)
            t3 = time.perf_counter()
            response = await ledger.post("/o/redeem/", data={"token": token})
            t4 = time.perf_counter()
            if response.status_code != 200:
                result.errors.note(f"round {i} redeem: HTTP {response.status_code} {response.text[:300]}")

            if timed:
                result.rounds += 1
                result.to_prompt.append(t_prompt - t0)
                result.bc_authorize_http.append(t_http - t0)
                result.approve_to_token.append(t2 - t1)
                result.approve_http.append(t_approved - t1)
                result.collect_http.append(t2 - t_approved)
                result.redeem_http.append(t4 - t3)
        result.cpu = stack.cpu_usage(cpu_start, stack.cpu_sample())
        result.wall = result.cpu.wall
    finally:
        await inbox.close()
        for client in (agent, ledger, officer):
            await client.aclose()
    return result


# --- phase 2: redemption race -----------------------------------------------------------------

# The race from wrk (C, one event loop per thread), so that the load generator costs a small part
# of a core and the figure is the server's. Each thread takes every nthreads-th token and asks about
# it ``per`` times in a row: its connections are all redeeming the same token at about the same
# time, as the Python redeemers do. After its last token a connection waits (``delay``) instead of
# sending anything; this process stops wrk (SIGINT: it prints its figures) once the database holds
# every redemption and the losing attempts have had their answers.
WRK_RACE = r"""
local threads = {}
local count = 0
function setup(thread)
  thread:set("tid", count)
  count = count + 1
  table.insert(threads, thread)
end

function init(args)
  local nthreads, auth = tonumber(args[2]), args[4]
  per = tonumber(args[3])
  tokens = {}
  local i = 0
  for line in io.lines(args[1]) do
    if i % nthreads == tid then tokens[#tokens + 1] = line end
    i = i + 1
  end
  sent, answered, ok, already, other = 0, 0, 0, 0, 0
  headers = {["Authorization"] = auth, ["Content-Type"] = "application/x-www-form-urlencoded"}
end

function delay()
  if sent >= #tokens * per then return 3600000 end
  return 0
end

function request()
  local index = math.floor(sent / per) + 1
  if index > #tokens then index = #tokens end  -- not sent before delay() has run out
  sent = sent + 1
  return wrk.format("POST", "/o/redeem/", headers, "token=" .. tokens[index])
end

function response(status, headers, body)
  answered = answered + 1
  if status == 200 then
    ok = ok + 1
  elseif status == 400 and string.find(body, '"reason": *"already_redeemed"') then
    already = already + 1
  else
    other = other + 1
    if other <= 3 then print("refusal " .. status .. " " .. string.sub(body, 1, 200)) end
  end
end

function done(summary, latency, requests)
  local t = {ok = 0, already = 0, other = 0, answered = 0, tokens = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do
      if k == "tokens" then t[k] = t[k] + #thread:get("tokens") else t[k] = t[k] + thread:get(k) end
    end
  end
  io.write(string.format(
    'RESULT {"ok": %d, "already": %d, "other": %d, "answered": %d, "tokens": %d, ' ..
    '"duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    t.ok, t.already, t.other, t.answered, t.tokens, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def redemption_race_wrk(base: str, data: dict[str, Any], args: argparse.Namespace, tmp: Path) -> Race:
    """The same race driven by wrk; latencies are wrk's (p50, p99, max), not per attempt. The wall
    time runs from wrk's start until the database holds every redemption."""
    race = Race()
    tokens_file, script = tmp / "race_tokens.txt", tmp / "race.lua"
    tokens_file.write_text("".join(f"{token}\n" for _, token in data["race_tokens"]))
    script.write_text(WRK_RACE)
    connections = args.race_concurrency * args.redeemers
    threads = min(2, connections)
    auth = basic(data["ledger_client_id"], data["ledger_secret"])
    import psycopg

    jtis = [jti for jti, _ in data["race_tokens"]]
    with psycopg.connect(args.database_url, connect_timeout=10, autocommit=True) as conn:
        proc = subprocess.Popen(
            [
                "wrk",
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{int(args.timeout)}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                base,
                "--",
                str(tokens_file),
                str(threads),
                str(args.redeemers),
                auth,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        t0 = time.perf_counter()
        # Waiting costs PostgreSQL little: first only the last tokens sent (a few index lookups every
        # 20 ms), then every token until all are in. Counting all 9,000 every 50 ms had been a tenth
        # of PostgreSQL's CPU during the race, taken from the servers being measured.
        last = jtis[-4 * args.race_concurrency :]
        for watched, pause in ((last, 0.02), (jtis, 0.05)):
            redeemed = 0
            while redeemed < len(watched) and proc.poll() is None and time.monotonic() < args.deadline:
                time.sleep(pause)
                redeemed = scalar(
                    conn.execute(
                        "SELECT count(*) FROM approvals_actiontoken WHERE redeemed_at IS NOT NULL AND jti = ANY(%s)",
                        [watched],
                    ).fetchone()
                )
        race.wall = time.perf_counter() - t0
    time.sleep(0.5)  # the losing attempts of the last tokens get their answers
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    result = next((line for line in stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        race.errors.note(f"wrk: exit {proc.returncode}: {stdout[-500:]} {stderr[-500:]}")
        return race
    figures = json.loads(result.removeprefix("RESULT "))
    for line in stdout.splitlines():
        if line.startswith("refusal "):
            race.errors.note(line)
    race.tokens = figures["tokens"]
    race.attempts = figures["answered"]
    race.successes, race.already = figures["ok"], figures["already"]
    if figures["other"]:
        race.other_refusals["other"] = figures["other"]
    race.latencies = [figures["p50_us"] / 1e6, figures["p99_us"] / 1e6, figures["max_us"] / 1e6]
    if race.successes > race.tokens:
        race.per_token["(responses)"] = race.successes - race.tokens + 1  # more successes than tokens
    return race


@dataclass
class Race:
    tokens: int = 0
    attempts: int = 0
    successes: int = 0
    already: int = 0
    other_refusals: Counter[str] = field(default_factory=Counter)
    per_token: Counter[str] = field(default_factory=Counter)  # jti -> successes seen in responses
    latencies: list[float] = field(default_factory=list)
    errors: Errors = field(default_factory=Errors)
    wall: float = 0.0
    skipped: int = 0

    @property
    def doubles(self) -> int:
        return sum(1 for n in self.per_token.values() if n > 1)


async def redemption_race(base: str, data: dict[str, Any], args: argparse.Namespace) -> Race:
    race = Race()
    pool = args.race_concurrency * args.redeemers
    client = httpx.AsyncClient(
        base_url=base,
        trust_env=False,
        timeout=args.request_timeout,
        headers={"Authorization": basic(data["ledger_client_id"], data["ledger_secret"])},
        # keep-alive shorter than uvicorn's 5 s, so no request is sent on a connection it is closing
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=2.0),
    )
    tokens = iter(data["race_tokens"])

    async def attempt(jti: str, token: str) -> None:
        start = time.perf_counter()
        try:
            response = await client.post("/o/redeem/", data={"token": token})
        except httpx.HTTPError as exc:
            race.attempts += 1
            race.latencies.append(time.perf_counter() - start)
            race.errors.note(f"{type(exc).__name__}: {exc}")
            return
        race.attempts += 1
        race.latencies.append(time.perf_counter() - start)
        if response.status_code == 200:
            race.successes += 1
            race.per_token[jti] += 1
            return
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code == 400 and body.get("reason") == "already_redeemed":
            race.already += 1
        else:
            race.other_refusals[f"{response.status_code} {body.get('error', '?')}"] += 1
            race.errors.note(f"HTTP {response.status_code}: {response.text[:300]}")

    async def worker() -> None:
        for jti, token in tokens:  # a shared iterator: each token is taken once
            if time.monotonic() > args.deadline:
                race.skipped += 1
                continue
            race.tokens += 1
            await asyncio.gather(*(attempt(jti, token) for _ in range(args.redeemers)))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.race_concurrency)))
        race.wall = time.perf_counter() - t0
    finally:
        await client.aclose()
    return race


def race_database_check(database_url: str, data: dict[str, Any]) -> dict[str, Any]:
    """Count redemptions in the database: rows, states and audit events per jti."""
    import psycopg

    jtis = [jti for jti, _ in data["race_tokens"]]
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        redeemed_rows = scalar(
            conn.execute(
                "SELECT count(*) FROM approvals_actiontoken WHERE jti = ANY(%s) AND redeemed_at IS NOT NULL",
                [jtis],
            ).fetchone()
        )
        redeemed_approvals = scalar(
            conn.execute(
                "SELECT count(*) FROM approvals_approvalrequest WHERE grant_id = %s AND status = 'redeemed'",
                [data["race_grant_id"]],
            ).fetchone()
        )
        events = conn.execute(
            "SELECT detail->>'jti' AS jti, count(*) FROM audit_auditevent "
            "WHERE event = 'action_token.redeemed' AND detail->>'jti' = ANY(%s) GROUP BY 1",
            [jtis],
        ).fetchall()
        refusals = scalar(
            conn.execute(
                "SELECT count(*) FROM audit_auditevent WHERE event = 'redemption.refused'"
            ).fetchone()
        )
    return {
        "redeemed_rows": redeemed_rows,
        "redeemed_approvals": redeemed_approvals,
        "audit_redeemed": sum(n for _, n in events),
        "audit_jtis": len(events),
        "audit_doubles": sum(1 for _, n in events if n > 1),
        "audit_refusals": refusals,
    }


# --- the stack ------------------------------------------------------------------------------------


class Roundtrip:
    """The stack: PostgreSQL database, web process (and websocket process if served apart), Celery worker."""

    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args, self.stack = args, stack
        self.port, self.ws_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = self.url  # the web process serves websockets unless a ws process is started
        # Django: "When using ASGI, persistent connections should be disabled" (ref/databases).
        # By default the bench runs the product's settings with CONN_MAX_AGE forced to 0, so a
        # configuration that keeps connections open cannot exhaust a PostgreSQL server it shares.
        (stack.tmp / "bench_settings.py").write_text(
            "from config.settings import *  # noqa: F401,F403\n"
            "from config.settings import DATABASES\n\n"
            "DATABASES['default']['CONN_MAX_AGE'] = 0\n"
        )
        self._env = self.make_env()

    def make_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("DEBUG", "ALLOWED_HOSTS", "COUNTERSIGN_SIGNING_KEY_CACHE_SECONDS"):
            env.pop(name, None)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.settings"
                if self.args.product_db_connections
                else "bench_settings",
                "PYTHONPATH": os.pathsep.join(
                    [str(self.stack.tmp), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
                ),
                "DATABASE_URL": self.args.database_url,
                "REDIS_URL": self.args.redis_url,
                "COUNTERSIGN_ISSUER": self.url,
                "COUNTERSIGN_VAR_DIR": str(self.stack.tmp),
                "SECRET_KEY": self.args.secret_key,
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
                **BENCH_LIMITS_ENV,
            }
        )
        return env

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def start(self) -> tuple[Proc, Proc]:
        stack = self.stack
        # Stale tasks from an earlier run on this Redis database would hit a database that is gone.
        celery_purge(stack, self.env())
        web = start_web(stack, "web", self.port, self.env(), workers=self.args.web_workers)
        ws = start_ws(stack, "ws", self.ws_port, self.env())
        worker = start_celery_worker(
            stack,
            "worker",
            self.env(),
            concurrency=self.args.celery_concurrency,
            hostname=f"bench-{self.port}@%h",
        )
        start_sealer(stack, self.env())
        stack.wait_http(web, "/.well-known/oauth-authorization-server")
        if ws is not None:
            stack.wait_port(ws)
            self.ws_url = ws.url
        wait_celery_ready(stack, worker)
        log(f"  stack ready on {self.url}" + (f", websockets on {self.ws_url}" if ws is not None else ""))
        return web, worker

    def stop(self) -> None:
        """Stop the processes, then drop what the stopped worker handed back to the queue."""
        started = bool(self.stack.procs)
        self.stack.stop_all()
        if started:
            celery_purge(self.stack, self.env(), quiet=True)


def run(args: argparse.Namespace, stack: Stack) -> int:
    rig = Roundtrip(args, stack)
    cores = os.cpu_count() or 1
    monitor: ConnectionMonitor | None = None
    try:
        log(f"setup (cores={cores}, tmp={stack.tmp})")
        stack.create_database(args.database_url, drop_existing=args.drop_existing)
        stack.run_step([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], rig.env(), "migrate")
        data_path = stack.tmp / "setup.json"
        token_ttl = int(args.timeout) + 600
        stack.run_step(
            [
                sys.executable,
                "-c",
                SETUP_SCRIPT,
                str(data_path),
                str(args.tokens),
                str(token_ttl),
                REDIRECT_URI,
                LEDGER_AUDIENCE,
            ],
            rig.env(),
            f"scenario, grants, {args.tokens} issued action tokens",
        )
        stack.analyze(args.database_url)
        data = json.loads(data_path.read_text())
        rig.start()
        monitor = ConnectionMonitor(args.database_url)
        monitor.start()

        monitor.phase = "round trip"
        log(
            f"\nphase 1: {args.rounds} approval round trips (+{args.warmup} warm-up), sequential; "
            f"load average {loadavg()}"
        )
        rt = asyncio.run(approval_roundtrip(stack, rig.url, rig.ws_url, data, args))
        log(
            f"phase 2: redemption race, {args.tokens} tokens x {args.redeemers} concurrent redeemers, "
            f"{args.race_concurrency} tokens in flight"
        )
        monitor.phase = "race"
        log(f"  load average {loadavg()}")
        before = stack.cpu_sample()
        if args.race_loadgen == "wrk":
            race = redemption_race_wrk(rig.url, data, args, stack.tmp)
        else:
            race = asyncio.run(redemption_race(rig.url, data, args))
        race_cpu = stack.cpu_usage(before, stack.cpu_sample())
        log(f"  load average {loadavg()}")
        monitor.stop()
        db = race_database_check(args.database_url, data)
        worker_log = stack.log_tail("worker", 6000)
        server_log = stack.log_tail("web", 6000)
    finally:
        if monitor is not None:
            monitor.stop()
        rig.stop()

    conn_age = "60 (product setting)" if args.product_db_connections else "0 (bench override)"
    log(
        f"\nDB connections: CONN_MAX_AGE={conn_age}; peak PostgreSQL backends on the bench database: "
        + ", ".join(f"{k} {v}" for k, v in monitor.peak.items())
    )
    log("\n[approval round trip]")
    log(f"  rounds            {rt.rounds} timed, wall {rt.wall:.2f}s, errors {rt.errors.count}")
    for sample in rt.errors.samples:
        log(f"    error: {sample}")
    log(f"  (a) request -> prompt on websocket     {dist(rt.to_prompt)}")
    log(f"      of which POST /o/bc-authorize/      {dist(rt.bc_authorize_http)}")
    log(f"  (b) approve -> agent holds token       {dist(rt.approve_to_token)}")
    log(f"      of which POST approve (302)         {dist(rt.approve_http)}")
    log(f"      of which CIBA token poll (200)      {dist(rt.collect_http)}")
    log(f"  redeem once (ledger, not in a or b)    {dist(rt.redeem_http)}")
    if rt.rounds and rt.cpu is not None:
        log(f"  CPU                                    {rt.cpu.line(rt.rounds, 'round')}")
        log("                                         (a round: 4 HTTP requests + 1 websocket push)")
        log(f"  machine                                {rt.cpu.machine_line(cores)}")

    ok_race = race.wall > 0
    log("\n[redemption race]")
    log(
        f"  tokens            {race.tokens}"
        + (f"  (not tried, deadline: {race.skipped})" if race.skipped else "")
    )
    log(f"  attempts          {race.attempts}  ({args.redeemers} concurrent per token)")
    log(f"  successes         {race.successes}")
    log(f"  already redeemed  {race.already}")
    log(f"  other outcomes    {dict(race.other_refusals) or 0}")
    for sample in race.errors.samples:
        log(f"    error: {sample}")
    log(f"  wall seconds      {race.wall:.2f}")
    if ok_race:
        log(f"  attempts/s        {race.attempts / race.wall:.1f}")
        log(f"  successes/s       {race.successes / race.wall:.1f}")
    if args.race_loadgen == "wrk" and len(race.latencies) == 3:
        p50, p99, top = (x * 1000 for x in race.latencies)
        log(f"  attempt latency   (wrk) p50 {p50:.1f}  p99 {p99:.1f}  max {top:.1f} ms")
    else:
        log(f"  attempt latency   {dist(race.latencies)}")
    if race.attempts:
        log(f"  CPU               {race_cpu.line(race.attempts, 'attempt')}")
        log(f"  machine           {race_cpu.machine_line(cores)}")
    log(f"  double redemptions (responses)  {race.doubles}")
    log(
        f"  database: redeemed ActionToken rows {db['redeemed_rows']}, approvals in 'redeemed' "
        f"{db['redeemed_approvals']}, action_token.redeemed audit events {db['audit_redeemed']} over "
        f"{db['audit_jtis']} jtis, jtis with more than one such event {db['audit_doubles']}, "
        f"redemption.refused audit events {db['audit_refusals']}"
    )
    db_doubles = db["audit_doubles"] + max(0, db["audit_redeemed"] - db["redeemed_rows"])
    consistent = db["redeemed_rows"] == race.successes == db["audit_redeemed"] == db["redeemed_approvals"]
    log(
        f"  double redemptions (database)   {db_doubles}"
        f"  (responses, rows, states and audit agree: {'yes' if consistent else 'NO'})"
    )

    failed = bool(
        rt.errors.count or race.errors.count or race.doubles or db_doubles or not consistent or race.skipped
    )
    if failed:
        log("\ncelery worker log (tail):\n" + worker_log)
        log("\nweb log (tail):\n" + server_log)
    a = sorted(x * 1000 for x in rt.to_prompt)
    b = sorted(x * 1000 for x in rt.approve_to_token)
    round_cpu = rt.cpu.per(rt.rounds) if rt.cpu is not None else {}
    race_per = race_cpu.per(race.attempts)
    log("")
    log(
        f"approval_roundtrip request_to_prompt_p50_ms={percentile(a, 50):.2f} p99={percentile(a, 99):.2f} "
        f"approve_to_token_p50_ms={percentile(b, 50):.2f} p99={percentile(b, 99):.2f} "
        f"rounds={rt.rounds} redeem_attempts_per_s={race.attempts / race.wall if ok_race else 0:.1f} "
        f"redeem_successes_per_s={race.successes / race.wall if ok_race else 0:.1f} "
        + "".join(f"round_{k}_cpu_ms={v:.2f} " for k, v in round_cpu.items() if v is not None)
        + "".join(f"redeem_{k}_cpu_ms={v:.2f} " for k, v in race_per.items() if v is not None)
        + f"double_redemptions={race.doubles + db_doubles} cores={cores}"
    )
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=300, help="timed approval round trips (max 5000)")
    p.add_argument("--warmup", type=int, default=10, help="untimed round trips first")
    p.add_argument("--tokens", type=int, default=5000, help="action tokens in the redemption race")
    p.add_argument("--redeemers", type=int, default=4, help="concurrent redeemers per token (at least 4)")
    p.add_argument("--race-concurrency", type=int, default=16, help="tokens being raced at the same time")
    p.add_argument(
        "--race-loadgen",
        choices=("wrk", "httpx"),
        default="wrk" if shutil.which("wrk") else "httpx",
        help="what drives the redemption race: wrk (C, Debian package wrk; the default when it is "
        "installed) or httpx from this process",
    )
    p.add_argument(
        "--web-workers",
        type=int,
        default=1,
        help="web processes on the one port (granian workers; 2 for the two-core redemption figure)",
    )
    p.add_argument("--celery-concurrency", type=int, default=2, help="Celery worker processes")
    p.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/countersign_bench_approvals",
        help="loopback PostgreSQL; this database is created for the run and dropped after it",
    )
    p.add_argument(
        "--drop-existing", action="store_true", help="drop the database first if it already exists"
    )
    p.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="Celery broker and channel layer (its countersign queue is purged first)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="global limit in seconds for the whole run")
    p.add_argument("--wait-timeout", type=float, default=10, help="longest wait for one prompt (seconds)")
    p.add_argument("--request-timeout", type=float, default=30, help="per-request timeout in seconds")
    p.add_argument(
        "--product-db-connections",
        action="store_true",
        help="run with config.settings unchanged (conn_max_age=60 under ASGI); by default the "
        "server and worker use CONN_MAX_AGE=0, as Django prescribes for ASGI",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server and worker logs)")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 5000:
        p.error("--rounds must be between 1 and 5000")
    if args.web_workers < 1 or args.web_workers > 4:
        p.error("--web-workers must be between 1 and 4")
    if args.warmup < 0 or args.tokens < 1 or args.race_concurrency < 1 or args.celery_concurrency < 1:
        p.error(
            "--warmup must not be negative; --tokens, --race-concurrency, --celery-concurrency at least 1"
        )
    if args.tokens > 50_000:
        p.error("--tokens is capped at 50000")
    if args.redeemers < 4:
        p.error("--redeemers must be at least 4")
    if args.tokens * args.redeemers < 20_000:
        log(f"note: {args.tokens * args.redeemers} redemption attempts (fewer than 20000)")
    if urlparse(args.redis_url).hostname not in LOOPBACK:
        p.error("--redis-url must point at a loopback host (127.0.0.1, localhost, ::1)")
    check_database_url(p, "--database-url", args.database_url)
    args.secret_key = secrets.token_urlsafe(50)
    args.deadline = time.monotonic() + args.timeout
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with Stack(prefix="bench-approvals", timeout=args.timeout, keep_tmp=args.keep_tmp) as stack:
        args.deadline = stack.deadline
        return run(args, stack)


if __name__ == "__main__":
    sys.exit(run_main(main))

#!/usr/bin/env python
"""CPU per token request inside one process, through the production WSGI callable: no HTTP server, no network.

What the other benchmarks cannot show: how much of a request is the application itself
(middleware, view, grant, SQL, signing, audit) and which statements it runs. Starts from a
fresh PostgreSQL database (created and dropped here), prepares authorization codes, then
calls the WSGI application with prebuilt requests:

1. code exchange (``grant_type=authorization_code``, PKCE S256, HTTP Basic), ``--requests`` times;
2. refresh, a chain of ``--requests`` rotations;
3. redemption (``/o/redeem/``, resource-server HTTP Basic) of ``--requests`` issued action tokens: the
   winning attempt of each;
4. the same attempts again: the twin of a race that lands in the process that just redeemed the
   token (answered from memory, refusal audited);
5. the same attempts after this process forgot them: the twin that lands in another process
   (decided by the database).

Prints the statements one request runs and the process CPU per request for each phase;
``--profile`` adds the functions that take the most CPU (cProfile on process time);
``--instructions`` runs the child under valgrind's callgrind, counting only the timed loops, and
prints instructions per request: the same figure run to run (0.3 % apart) however fast the
machine is at the moment, so two trees compare on a shared machine. Counts this process only
(not PostgreSQL's), and everything the process does, the prebuilt requests' encoding included.

Usage (from the project root)::

    .venv/bin/python bench/inprocess.py --database-url postgres://postgres@127.0.0.1:5432/countersign_inproc
    .venv/bin/python bench/inprocess.py --requests 2000 --profile
    .venv/bin/python bench/inprocess.py --requests 200 --instructions
    .venv/bin/python bench/inprocess.py --requests 200 --instructions --keep-dumps /tmp/cg
    callgrind_annotate --inclusive=yes /tmp/cg/callgrind.code-exchange | head -60

Figures are for comparing runs on one machine; nothing is asserted on timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _stack import BENCH, BENCH_LIMITS_ENV, ROOT, Stack, check_database_url, log, run_main

CHILD = r"""
import base64, hashlib, io, json, os, secrets, sys, time
from datetime import timedelta
from urllib.parse import urlencode

import django
django.setup()

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from approvals import rar, redemption
from approvals.models import ActionToken, ApprovalRequest
from approvals.tokens import action_claims, mint
from consent.tokens import token_checksum
from consent.keys import active_signing_key
from consent.models import AuthorizationCode
from consent.services import AuthContext, agent_create, grant_create, resource_server_create, scope_set

n, profile = int(sys.argv[1]), sys.argv[2] == "1"
from _stack import postgres_cpu_seconds  # PostgreSQL's CPU, as bench/peers.py counts it

SCOPE, REDIRECT = "bench:read", "http://127.0.0.1:8199/callback"
scope_set(name=SCOPE, values={"audience": "http://bench.test", "description": "Benchmark scope",
                              "sensitivity": "standard"}, actor="bench")
STEP_UP, AUDIENCE = "bench:write", "http://ledger.bench"
scope_set(name=STEP_UP, values={"audience": AUDIENCE, "description": "Benchmark ledger", "sensitivity": "step_up",
                                "authorization_details_types": ["ledger_entry"], "action_token_ttl": 600},
          actor="bench")
ledger, ledger_secret = resource_server_create(name="Ledger", audience=AUDIENCE, actor="bench")
agent, secret = agent_create(name="Bench Agent", publisher="bench", scopes=[SCOPE, STEP_UP],
                             redirect_uris=[REDIRECT], actor="bench")
user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(24))
active_signing_key()
now = timezone.now()
codes = []
with transaction.atomic():
    for _ in range(n + 2):
        grant = grant_create(user=user, agent=agent, scopes=[SCOPE], lifetime=86400,
                             auth=AuthContext(auth_time=now, amr=["pwd"]), consent_shown={})
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        code = secrets.token_urlsafe(24)
        AuthorizationCode.objects.create(application=agent, user=user, code=code, expires=now + timedelta(hours=1),
                                         redirect_uri=REDIRECT, scope=SCOPE, code_challenge=challenge,
                                         code_challenge_method="S256", session_grant=grant)
        codes.append((code, verifier))

# Issued action tokens, as approval_collect leaves them (bench/approval_roundtrip.py makes the same).
race_grant = grant_create(user=user, agent=agent, scopes=[SCOPE, STEP_UP], lifetime=86400,
                          auth=AuthContext(auth_time=now, amr=["pwd"]), consent_shown={})
action_tokens = []
with transaction.atomic():
    for i in range(n + 1):
        details = [{"type": "ledger_entry", "actions": ["append"], "purchase_order": f"PO-{i:06d}",
                    "amount": f"{100 + i}.00", "currency": "USD"}]
        approval = ApprovalRequest.objects.create(
            auth_req_id_hash=hashlib.sha256(secrets.token_bytes(32)).hexdigest(), grant=race_grant, user=user,
            agent=agent, scope=STEP_UP, authorization_details=details, action_hash=rar.action_hash(details),
            headline="bench", created=now, expires_at=now + timedelta(seconds=600),
            status=ApprovalRequest.Status.ISSUED, decided_at=now, decided_by=user, decision_method="bench",
            decision_auth={"auth_time": int(now.timestamp()), "amr": ["pwd"], "acr": ""})
        claims = action_claims(approval=approval, audience=AUDIENCE, ttl=600)
        token = mint(claims)  # recorded with its digest, as approval collection records it
        ActionToken.objects.create(jti=claims["jti"], token_checksum=token_checksum(token), approval=approval,
                                   issued_at=now, expires_at=now + timedelta(seconds=600))
        action_tokens.append(token)

from config.wsgi import application as app  # the callable granian serves (protocol lane included)
authorization = "Basic " + base64.b64encode(f"{agent.client_id}:{secret}".encode()).decode()


ledger_authorization = "Basic " + base64.b64encode(f"{ledger.client_id}:{ledger_secret}".encode()).decode()


def call(form, path="/o/token/", credentials=authorization, expect="200"):
    body = urlencode(form).encode()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "8000", "HTTP_HOST": "127.0.0.1:8000", "wsgi.url_scheme": "http",
               "CONTENT_TYPE": "application/x-www-form-urlencoded", "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "HTTP_AUTHORIZATION": credentials,
               "REMOTE_ADDR": "127.0.0.1"}
    status = []
    out = b"".join(app(environ, lambda s, h: status.append(s)))
    assert status[0].startswith(expect), out
    return json.loads(out)


pending = iter(codes)
def exchange():
    code, verifier = next(pending)
    return call({"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                 "code_verifier": verifier})

refresh_token = exchange()["refresh_token"]
def refresh():
    global refresh_token
    refresh_token = call({"grant_type": "refresh_token", "refresh_token": refresh_token})["refresh_token"]

# Under --instructions: ask callgrind to turn counting on or off, zero or dump its counters, and run
# on until it has (it reads the request between instructions, so this process must not block).
def callgrind(*args):
    if os.environ.get("CS_CALLGRIND"):
        import subprocess
        ask = subprocess.Popen(["callgrind_control", *args, str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while ask.poll() is None:
            pass


def redeemer(expect):
    tokens = iter(action_tokens)
    return lambda: call({"token": next(tokens)}, "/o/redeem/", ledger_authorization, expect)


def forgetting(fn):
    def forget_then(fn=fn):
        redemption._SPENT._seen.clear()
        return fn()
    return forget_then


phases = (("code exchange", exchange), ("refresh", refresh), ("redemption", redeemer("200")),
          ("redemption repeat", redeemer("400")), ("redemption repeat elsewhere", forgetting(redeemer("400"))))
with connection.cursor() as cursor:
    cursor.execute("ANALYZE")  # as autovacuum would have by now (_stack.Stack.analyze)
# A repeat "this process remembers" for as long as the phases take: under callgrind they run 50
# times slower than the two seconds a race's twins are remembered for.
redemption.SPENT_SECONDS = 3600.0
only = [p for p in os.environ.get("CS_PHASES", "").split(",") if p]
for name, fn in phases:
    if only and name not in only:
        continue
    with CaptureQueriesContext(connection) as captured:
        fn()
    print(f"{name}: {len(captured.captured_queries)} statements (BEGIN and COMMIT included)")
    for q in captured.captured_queries:
        print("    " + str(q["sql"])[:110])
    if profile:
        import cProfile, pstats
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
    pg_start = postgres_cpu_seconds() or 0.0
    callgrind("--instr=on")
    callgrind("--zero")
    start = time.process_time()
    for _ in range(n - 1):
        fn()
    cpu = time.process_time() - start
    callgrind("--dump=" + name.replace(" ", "-"))
    callgrind("--instr=off")
    pg = (postgres_cpu_seconds() or 0.0) - pg_start
    if profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "20")))
    print(f"{name}: {cpu / (n - 1) * 1000:.3f} ms CPU per request in-process, PostgreSQL {pg / (n - 1) * 1000:.3f} ms"
          f" ({n - 1} requests)", flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/countersign_inproc")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="run the requests under valgrind's callgrind and print instructions per request: the same "
        "count for the same code whatever else the machine is doing (about 50x slower; use ~300 requests)",
    )
    parser.add_argument(
        "--keep-dumps",
        metavar="DIR",
        help="with --instructions: copy callgrind's dump of each phase into DIR, for callgrind_annotate",
    )
    parser.add_argument(
        "--phases",
        default="",
        help="comma-separated phase names to run (default: all): code exchange, refresh, redemption, "
        "redemption repeat, redemption repeat elsewhere",
    )
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    check_database_url(parser, "--database-url", args.database_url)
    with Stack(prefix="cs-inproc-", timeout=args.timeout) as stack:
        stack.create_database(args.database_url, drop_existing=True)
        env = {
            **os.environ,
            "DATABASE_URL": args.database_url,
            "REDIS_URL": args.redis_url,
            "COUNTERSIGN_VAR_DIR": str(stack.tmp),
            "DJANGO_SETTINGS_MODULE": "config.settings",
            **BENCH_LIMITS_ENV,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH)]),
            "CS_PHASES": args.phases,
        }
        stack.run_step([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], env, "migrate")
        log(f"{args.requests} requests per phase, in one process")
        command = [sys.executable, "-c", CHILD, str(args.requests), "1" if args.profile else "0"]
        out = stack.tmp / "callgrind.out"
        if args.instructions:
            env["CS_CALLGRIND"] = "1"
            command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                       *command]  # fmt: skip
        child = subprocess.run(command, cwd=ROOT, env=env, timeout=stack.remaining())
        for dump in sorted(stack.tmp.glob("callgrind.out.*")) if args.instructions else ():
            text = dump.read_text()
            phase = next(
                line.split("dump ", 1)[1] for line in text.splitlines() if line.startswith("desc: Trigger")
            )
            total = next(
                int(line.split()[1]) for line in text.splitlines() if line.startswith(("summary:", "totals:"))
            )
            print(f"{phase}: {total / (args.requests - 1) / 1e6:.3f} M instructions per request", flush=True)
            if args.keep_dumps:
                Path(args.keep_dumps).mkdir(parents=True, exist_ok=True)
                shutil.copy(dump, Path(args.keep_dumps) / f"callgrind.{phase}")
        return child.returncode


if __name__ == "__main__":
    sys.exit(run_main(main))

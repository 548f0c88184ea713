"""Real processes for production-operation tests: several server nodes and Celery workers over one
PostgreSQL database and one Redis, processes that can be killed and restarted, a Redis of our own
that can be stopped and started again, and a TCP forwarder in front of PostgreSQL that can be cut.

The clients are what a deployment sees: an agent over HTTP, an officer signed in through the login
form (session cookie + CSRF), and inbox websockets that reconnect the way static/countersign/inbox.js
does (250 ms * 2**retry, retry capped at 6, reset on open; each connect starts with a snapshot).

Nothing here asserts on timing: every wait has a generous limit and fails with the processes' logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from django.conf import settings
from websockets.sync.client import ClientConnection, connect

from config.serving import local_command, worker_command
from tests.conftest import Scenario
from tests.live import ROOT, _database_url, free_port

BIN = Path(sys.executable).parent
CIBA = "urn:openid:params:grant-type:ciba"

T = TypeVar("T")


def wait_for(
    check: Callable[[], T],
    what: str,
    timeout: float = 60.0,
    logs: Callable[[], str] = lambda: "",
    interval: float = 0.1,
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``logs()`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s\n{logs()}")
        time.sleep(interval)


def http() -> httpx.Client:
    # trust_env=False: loopback only, never through a proxy from the environment.
    return httpx.Client(trust_env=False, timeout=60)


# --- processes ------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a node's servers, or the Celery parent and its pool children)."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        if sig == signal.SIGKILL:
            return
        try:  # pool children of a stopped Celery parent
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Node:
    """One node on its own port: a web process (HTTP) and a ws process (websockets) behind the path
    router, as config.serving's ``local`` starts them; one process group, killed together."""

    name: str
    port: int
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/approvals/"


@dataclass
class Cluster:
    """N server nodes and M Celery workers sharing one database and one Redis.

    ``env`` is the environment of every process; ``COUNTERSIGN_ISSUER`` is node A's URL for all.
    """

    env: dict[str, str]
    log_dir: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    workers: dict[str, Proc] = field(default_factory=dict)
    _spawned: list[Proc] = field(default_factory=list)
    _generation: int = 0

    def _spawn(self, name: str, cmd: list[str], env: dict[str, object] | None = None) -> Proc:
        self._generation += 1
        log = self.log_dir / f"{name}-{self._generation}.log"
        popen = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**self.env, **{k: str(v) for k, v in (env or {}).items()}},
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = Proc(name, popen, log)
        self._spawned.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name} (exit {p.popen.poll()})\n{p.tail()}" for p in self._spawned)

    def add_node(self, name: str, port: int | None = None) -> Node:
        node = self.nodes.get(name) or Node(name, port or free_port())
        self.nodes[name] = node
        return node

    def start_node(self, name: str, env: dict[str, object] | None = None, wait: bool = True) -> Node:
        node = self.add_node(name)
        node.proc = self._spawn(f"node-{name}", local_command(node.port), env)
        if wait:
            self.wait_node(node)
        return node

    def wait_node(self, node: Node, timeout: float = 90) -> None:
        def up() -> bool:
            assert node.proc is not None, f"node {node.name} was never started"
            if not node.proc.alive:
                pytest.fail(f"node {node.name} exited\n{self.logs()}")
            try:
                return httpx.get(f"{node.url}/healthz", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, f"node {node.name} on {node.url}", timeout, self.logs, interval=0.2)

    def start_worker(
        self, name: str, env: dict[str, object] | None = None, concurrency: int = 2, wait: bool = True
    ) -> Proc:
        proc = self._spawn(
            f"celery-{name}",
            worker_command(
                concurrency=concurrency,
                hostname=f"ops-{name}-{os.getpid()}-{self._generation}@%h",
                extra=("--without-heartbeat",),
            ),
            env,
        )
        self.workers[name] = proc
        if wait:

            def ready() -> bool:
                if not proc.alive:
                    pytest.fail(f"celery {name} exited\n{self.logs()}")
                return "ready." in proc.tail(200_000)

            wait_for(ready, f"celery worker {name}", 120, self.logs, interval=0.2)
        return proc

    def start_beat(self, env: dict[str, object] | None = None) -> Proc:
        """The one scheduler: expiry and redelivery sweeps."""
        return self._spawn(
            "celery-beat",
            [
                str(BIN / "celery"),
                "-A",
                "config.celery:app",
                "beat",
                "--loglevel=INFO",
                f"--schedule={self.log_dir / f'beat-{self._generation}.db'}",
            ],
            env,
        )

    def start_sealer(self, env: dict[str, object] | None = None) -> Proc:
        """The audit sealer (``manage.py audit_seal --loop``), as the Procfile runs it."""
        return self._spawn("sealer", [sys.executable, "manage.py", "audit_seal", "--loop"], env)

    def stop(self) -> None:
        for proc in self._spawned:
            if proc.alive:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self._spawned:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)  # pool children, stragglers
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def cluster_env(
    *, issuer: str, redis_url: str, database_url: str | None = None, **extra: object
) -> dict[str, str]:
    """The environment of every server process (as tests/live.py's ``live_stack`` builds it)."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url or _database_url(),
        "COUNTERSIGN_ISSUER": issuer,
        "SECRET_KEY": settings.SECRET_KEY,
        "REDIS_URL": redis_url,
        "COUNTERSIGN_SIGNING_KEY_CACHE_SECONDS": "0",  # tests flush the key table between tests
        # PostgreSQL here allows 100 connections for everyone: small pools per process.
        "DATABASE_POOL_SIZE": "4",
        "WEB_THREADS": "4",  # no more threads than pooled connections
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
    }
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def purge(redis_url: str) -> None:
    """Drop queued tasks left on this Redis by an earlier run."""
    subprocess.run(
        [str(BIN / "celery"), "-A", "config.celery:app", "purge", "-f", "-Q", "countersign"],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        timeout=60,
    )


# --- a Redis of our own ---------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server on a free loopback port that the test may stop and start again (same port).

    Never the shared Redis on 6379. No persistence: a restart loses every key, as an unpersisted
    production Redis does (docs/deployment.md: Redis needs no persistence).
    """

    def __init__(self) -> None:
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is needed for this test")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_for(up, f"redis-server on {self.port}", 30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --- a TCP forwarder in front of PostgreSQL ----------------------------------------------------------


class TcpForwarder:
    """127.0.0.1:<port> -> target, one thread per direction per connection.

    ``cut()`` drops every open connection and closes new ones at once (the database is
    unreachable); ``restore()`` lets them through again. ``latency`` delays every chunk in both
    directions (a slow network) — used to keep a Celery worker busy long enough to kill it mid-work.
    ``cut_on(pattern)`` arms a one-shot trigger: the first chunk from a client containing
    ``pattern`` is not forwarded; everything is cut right there.
    """

    def __init__(self, target: tuple[str, int], latency: float = 0.0) -> None:
        self.target, self.latency = target, latency
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.accepted = 0
        self.refused = 0
        self.triggered = threading.Event()
        self._pattern: bytes | None = None
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def url_for(self, database_url: str) -> str:
        return re.sub(r"@[^/@]+/", f"@127.0.0.1:{self.port}/", database_url, count=1)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream, pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair, False), daemon=True).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        pair: tuple[socket.socket, socket.socket],
        from_client: bool,
    ) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self._pattern is not None:
                    window = tail + data
                    tail = data[-len(self._pattern) :]
                    if self._pattern in window:
                        self._pattern = None
                        self.triggered.set()
                        self.cut()
                        return
                if self.latency:
                    time.sleep(self.latency)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            self._pairs.discard(pair)
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut_on(self, pattern: bytes) -> None:
        self.triggered.clear()
        self._pattern = pattern

    def cut(self) -> None:
        self.up = False
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._drop(pair)

    def restore(self) -> None:
        self._pattern = None
        self.up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


# --- clients --------------------------------------------------------------------------------------


def basic_auth(client_id: str, secret: str) -> tuple[str, str]:
    return (client_id, secret)


class AgentHTTP:
    """The agent's side over real HTTP: ask (CIBA), poll the token endpoint; the ledger redeems."""

    def __init__(self, scenario: Scenario, session_token: str) -> None:
        self.s, self.session_token = scenario, session_token
        self.http = http()
        self.auth = (scenario.agent.client_id, scenario.agent_secret)

    def ask(self, node_url: str, details: dict[str, Any], **extra: str) -> httpx.Response:
        return self.http.post(
            f"{node_url}/o/bc-authorize/",
            auth=self.auth,
            data={
                "scope": "ledger:write",
                "login_hint_token": self.session_token,
                "authorization_details": json.dumps([details]),
                **extra,
            },
        )

    def poll(self, node_url: str, auth_req_id: str) -> httpx.Response:
        return self.http.post(
            f"{node_url}/o/token/", auth=self.auth, data={"grant_type": CIBA, "auth_req_id": auth_req_id}
        )

    def redeem(self, node_url: str, token: str) -> httpx.Response:
        return self.http.post(
            f"{node_url}/o/redeem/",
            auth=(self.s.ledger_client_id, self.s.ledger_secret),
            data={"token": token},
        )

    def close(self) -> None:
        self.http.close()


def ledger_entry(n: int, tag: str = "OPS") -> dict[str, Any]:
    return {
        "type": "ledger_entry",
        "actions": ["append"],
        "purchase_order": f"PO-{tag}-{n:04d}",
        "vendor": "Acme Office Supply",
        "amount": f"{1000 + n}.00",
        "currency": "USD",
    }


class Officer:
    """The officer in a browser without JavaScript: signs in through the login form, then POSTs
    Approve with the session cookie and the CSRF token, as the inbox page's forms do."""

    def __init__(self, node_url: str, username: str, password: str) -> None:
        self.url = node_url
        self.http = http()
        page = self.http.get(f"{node_url}/accounts/login/", params={"next": "/approvals/"})
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert page.status_code == 200 and token, page.text[:500]
        done = self.http.post(
            f"{node_url}/accounts/login/",
            data={
                "username": username,
                "password": password,
                "next": "/approvals/",
                "csrfmiddlewaretoken": token.group(1),
            },
            headers={"Origin": node_url, "Referer": f"{node_url}/accounts/login/"},
        )
        assert done.status_code == 302, done.text[:500]
        inbox = self.http.get(f"{node_url}/approvals/")  # the CSRF token rotates at login
        assert inbox.status_code == 200, inbox.text[:500]
        self.sessionid = self.http.cookies["sessionid"]
        self.csrftoken = self.http.cookies["csrftoken"]

    @property
    def cookie(self) -> str:
        return f"sessionid={self.sessionid}"

    def approve(self, approval_id: str, node_url: str | None = None) -> httpx.Response:
        base = node_url or self.url
        return self.http.post(
            f"{base}/approvals/{approval_id}/approve/",
            headers={"X-CSRFToken": self.csrftoken, "Origin": base, "Referer": f"{base}/approvals/"},
        )

    def close(self) -> None:
        self.http.close()


class ReconnectingInbox:
    """An inbox tab's websocket, in a thread, reconnecting like static/countersign/inbox.js.

    ``urls`` are the nodes a load balancer may hand the connection to: a failed or dropped
    connection moves on to the next one. ``pending`` mirrors the page's list (snapshot replaces it,
    upsert adds, remove drops); ``seen`` is every prompt id ever shown.
    """

    def __init__(self, urls: list[str], cookie: str, name: str = "inbox") -> None:
        self.urls, self.cookie, self.name = list(urls), cookie, name
        self.pending: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()
        self.upserts: list[str] = []
        self.snapshots = 0
        self.last_snapshot: list[str] = []  # prompt ids replayed on the latest (re)connect
        self.connects = 0
        self.connected_to: str | None = None
        self.history: list[str] = []  # what happened, for failure messages
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ws: ClientConnection | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _note(self, text: str) -> None:
        self.history.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _run(self) -> None:
        retry, index = 0, 0
        while not self._stop.is_set():
            url = self.urls[index % len(self.urls)]
            try:
                with connect(
                    url.replace("http://", "ws://") + "/ws/approvals/",
                    open_timeout=10,
                    additional_headers={"Cookie": self.cookie, "Origin": url},
                ) as ws:
                    retry = 0  # inbox.js: ws.onopen resets the backoff
                    with self._cond:
                        self._ws, self.connected_to = ws, url
                        self.connects += 1
                        self._cond.notify_all()
                    self._note(f"connected to {url}")
                    try:
                        while not self._stop.is_set():
                            try:
                                raw = ws.recv(timeout=0.5)
                            except TimeoutError:
                                continue
                            self._handle(json.loads(raw))
                    finally:
                        with self._cond:
                            self._ws, self.connected_to = None, None
                            self._cond.notify_all()
            except Exception as exc:  # refused, handshake failed, closed by the server, the node died, ...
                self._note(f"{url}: {type(exc).__name__}: {exc}"[:300])
                index += 1
            if self._stop.is_set():
                return
            retry = min(retry + 1, 6)  # inbox.js: ws.onclose
            self._stop.wait(0.25 * 2**retry)

    def _handle(self, msg: dict[str, Any]) -> None:
        with self._cond:
            if msg["type"] == "snapshot":
                self.snapshots += 1
                self.pending = {p["id"]: p for p in msg["prompts"]}
                self.last_snapshot = [p["id"] for p in msg["prompts"]]
                self.seen.update(self.pending)
                self._note(f"snapshot of {len(self.pending)}")
            elif msg["type"] == "upsert":
                prompt = msg["prompt"]
                self.pending[prompt["id"]] = prompt
                self.seen.add(prompt["id"])
                self.upserts.append(prompt["id"])
            elif msg["type"] == "remove":
                self.pending.pop(msg["id"], None)
            self._cond.notify_all()

    def wait(
        self,
        predicate: Callable[[ReconnectingInbox], object],
        what: str,
        timeout: float = 90.0,
        logs: Callable[[], str] = lambda: "",
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(
                        f"{self.name}: {what} not within {timeout:.0f}s; pending={sorted(self.pending)} "
                        f"connects={self.connects} snapshots={self.snapshots}\n"
                        + "\n".join(self.history[-30:])
                        + "\n"
                        + logs()
                    )
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
        self._thread.join(timeout=10)

"""What every benchmark here needs to run a real stack on loopback and read it honestly.

- ``Stack``: a temp dir, a global deadline with a watchdog, processes each started in its own
  process group (so stopping one stops its children), PostgreSQL databases created for the run,
  an optional private ``redis-server``; ``close()`` (also on ``with`` exit, Ctrl-C, SIGTERM or
  the watchdog) kills every process group, drops every database and removes the temp dir.
- ``start_web``: the one place that knows how a web process is started (see its docstring).
- CPU accounting per process group: utime+stime from ``/proc/<pid>/stat`` of every process in
  the group, read before and after a phase, gives server CPU per request per process kind.
- Percentiles (nearest rank) and one-line summaries.

Linux only for the CPU figures (``/proc``); elsewhere they print as n/a.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any
from urllib.parse import urlencode, urlparse

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

# The rate limiter stays in the request path (its Redis round trip is part of what is measured),
# with limits no benchmark reaches: one load generator on 127.0.0.1 is one "source" and a handful of
# "clients", far past what a deployment allows any single one of them.
_UNREACHABLE = [10**9, 60]
# Likewise the prompts-per-window caps: a benchmark's officer answers thousands of prompts in minutes.
BENCH_LIMITS_ENV = {
    "COUNTERSIGN_RATE_LIMITS": json.dumps(
        {"all": {"paths": ["/"], "client": _UNREACHABLE, "user": _UNREACHABLE, "source": _UNREACHABLE}}
    ),
    "COUNTERSIGN_MAX_PROMPTS_PER_USER_IN_WINDOW": str(10**9),
    "COUNTERSIGN_MAX_PROMPTS_PER_AGENT_IN_WINDOW": str(10**9),
}
BIN = Path(sys.executable).parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def log(msg: str = "") -> None:
    print(msg, flush=True)


def scalar(row: tuple[Any, ...] | None) -> Any:
    """The first column of the row a query always returns."""
    assert row is not None
    return row[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --- statistics ---------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def percentiles_ms(values_s: Iterable[float]) -> dict[str, float]:
    """n, p50, p90, p99 and max in milliseconds of latencies given in seconds."""
    ms = sorted(v * 1000 for v in values_s)
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": ms[-1] if ms else 0.0,
    }


def dist(values_s: Iterable[float], digits: int = 2) -> str:
    q = percentiles_ms(values_s)
    if not q["n"]:
        return "no samples"
    f = f"{{:.{digits}f}}"
    return (
        f"n={q['n']}  p50 {f.format(q['p50'])}  p90 {f.format(q['p90'])}  p99 {f.format(q['p99'])}  "
        f"max {f.format(q['max'])} ms"
    )


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# --- CPU accounting -------------------------------------------------------------------------------


def _processes() -> Iterator[tuple[str, list[str]]]:
    """(command name, /proc/<pid>/stat fields from field 3 on) of every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
        yield stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def group_cpu_seconds(pgids: Iterable[int]) -> float | None:
    """user+system CPU seconds of every live process in these process groups (None without /proc).

    A process that exits during a phase takes its CPU with it; servers here keep their processes.
    """
    if not Path("/proc").is_dir():
        return None
    wanted = set(pgids)
    ticks = sum(int(f[11]) + int(f[12]) for _, f in _processes() if int(f[2]) in wanted)
    return ticks / _CLK_TCK


def postgres_cpu_seconds() -> float | None:
    """user+system CPU seconds of every live PostgreSQL process on this machine (None without /proc).

    For a database on loopback, the work a phase's statements cost the server: compare phases run
    one after another, as other clients' statements land in it too. Backends that exit during a
    phase take their CPU with them; the servers' pools keep theirs.
    """
    if not Path("/proc").is_dir():
        return None
    ticks = sum(int(f[11]) + int(f[12]) for name, f in _processes() if name == "postgres")
    return ticks / _CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return (total - values[3] - values[4]) / _CLK_TCK, total / _CLK_TCK


@dataclass
class CpuSample:
    """CPU seconds per process kind, this process's own, the machine's, and a wall clock."""

    kinds: dict[str, float | None]
    client: float
    machine: tuple[float, float] | None
    wall: float


@dataclass
class CpuUsage:
    kinds: dict[str, float | None]  # CPU seconds during the phase per process kind
    client: float
    machine_busy: float | None
    wall: float

    def per(self, n: int) -> dict[str, float | None]:
        """Milliseconds per unit (request, flow, round) per process kind."""
        return {k: (None if v is None or not n else 1000 * v / n) for k, v in self.kinds.items()}

    def line(self, n: int, unit: str = "request") -> str:
        parts = [f"{k} {v:.2f} ms" if v is not None else f"{k} n/a" for k, v in self.per(n).items()]
        client = f"; load generator {1000 * self.client / n:.2f} ms" if n else ""
        left_out = "PostgreSQL not included" if "redis" in self.kinds else "PostgreSQL and Redis not included"
        return ", ".join(parts) + f" per {unit}{client}  ({left_out})"

    def machine_line(self, cores: int) -> str:
        if self.machine_busy is None or self.wall <= 0:
            return "machine CPU n/a"
        other = self.machine_busy - sum(v or 0.0 for v in self.kinds.values()) - self.client
        return (
            f"machine {self.machine_busy / self.wall:.2f} of {cores} cores busy; everything else "
            f"(PostgreSQL, Redis, other work) {max(0.0, other) / self.wall:.2f} cores"
        )


# --- the stack -------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    kind: str  # web, ws, worker, redis, ... : CPU is reported per kind
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Stack:
    """Processes, databases and a temp dir for one benchmark run, all torn down by ``close()``."""

    def __init__(self, *, prefix: str, timeout: float, keep_tmp: bool = False, grace: float = 30) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"countersign-{prefix}-"))
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.keep_tmp = keep_tmp
        self.procs: dict[str, Proc] = {}
        self._databases: list[tuple[str, str]] = []  # (admin conninfo, name)
        self._lock = threading.RLock()
        self._closed = False
        self._watchdog = threading.Timer(timeout + grace, self._fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fire(self) -> None:
        log(f"\nglobal timeout ({self.timeout:.0f}s + grace) reached: stopping")
        self.close()
        os._exit(3)

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._watchdog.cancel()
            self.stop_all()
            for admin, name in reversed(self._databases):
                drop_database(admin, name)
            self._databases.clear()
            if self.keep_tmp:
                log(f"kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # one-off commands ------------------------------------------------------------------------------

    def run_step(self, cmd: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess[str]:
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=self.remaining(),
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise SystemExit(
                f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        log(f"  {what}: {time.perf_counter() - t0:.1f}s")
        return proc

    # long-running processes ----------------------------------------------------------------------

    def spawn(
        self, name: str, cmd: list[str], env: dict[str, str], *, kind: str, port: int | None = None
    ) -> Proc:
        """Start ``cmd`` in its own session (hence process group) with output to ``<tmp>/<name>.log``."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} is already running")
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, kind, popen, log_path, port)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, chars: int = 4000) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until(self, proc: Proc, check: Callable[[], bool], what: str, limit: float = 60) -> None:
        ready_by = min(self.deadline, time.monotonic() + limit)
        while time.monotonic() < ready_by:
            if proc.popen.poll() is not None:
                raise SystemExit(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{self.log_tail(proc.name)}"
                )
            if check():
                return
            time.sleep(0.1)
        raise SystemExit(f"{what} not ready in time:\n{self.log_tail(proc.name)}")

    def wait_http(self, proc: Proc, path: str, limit: float = 60) -> None:
        """Until GET ``path`` on the process's port answers 200."""
        import httpx

        def up() -> bool:
            try:
                return httpx.get(proc.url + path, timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_until(proc, up, f"{proc.name} ({proc.url}{path})", limit)

    def wait_port(self, proc: Proc, limit: float = 60) -> None:
        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", proc.port), timeout=0.5):
                    return True
            except OSError:
                return False

        self.wait_until(proc, up, f"{proc.name} (port {proc.port})", limit)

    def stop(self, names: Iterable[str] | None = None) -> None:
        """SIGTERM each process group, wait, then SIGKILL whatever is left of it (pool children)."""
        with self._lock:
            chosen = [
                self.procs.pop(n) for n in list(self.procs if names is None else names) if n in self.procs
            ]
        for proc in chosen:
            _signal_group(proc.popen.pid, signal.SIGTERM)
        for proc in chosen:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.popen.pid, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self) -> None:
        self.stop(None)

    # CPU per process kind --------------------------------------------------------------------------

    def pgids(self, kind: str | None = None, names: Iterable[str] | None = None) -> list[int]:
        chosen = [
            p
            for p in self.procs.values()
            if (kind is None or p.kind == kind) and (names is None or p.name in names)
        ]
        return [p.popen.pid for p in chosen if p.popen.poll() is None]  # session leader: pid == pgid

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(p.kind for p in self.procs.values()))

    def cpu_sample(self, groups: dict[str, list[str]] | None = None) -> CpuSample:
        """CPU seconds so far per process kind (or per named group of process names)."""
        if groups is None:
            kinds = {k: group_cpu_seconds(self.pgids(kind=k)) for k in self.kinds()}
        else:
            kinds = {k: group_cpu_seconds(self.pgids(names=names)) for k, names in groups.items()}
        return CpuSample(kinds, self_cpu_seconds(), machine_cpu_seconds(), time.perf_counter())

    @staticmethod
    def cpu_usage(before: CpuSample, after: CpuSample) -> CpuUsage:
        kinds: dict[str, float | None] = {}
        for k, v in after.kinds.items():
            was = before.kinds.get(k)
            kinds[k] = None if was is None or v is None else v - was
        busy = None
        if before.machine is not None and after.machine is not None:
            busy = after.machine[0] - before.machine[0]
        return CpuUsage(kinds, after.client - before.client, busy, after.wall - before.wall)

    # PostgreSQL and Redis ----------------------------------------------------------------------------

    def create_database(self, url: str, *, drop_existing: bool = False) -> None:
        """Create the database ``url`` names (dropped again by ``close()``)."""
        import psycopg
        from psycopg import sql

        parsed = urlparse(url)
        name = parsed.path.lstrip("/")
        admin = parsed._replace(path="/postgres").geturl()
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if exists and not drop_existing:
                raise SystemExit(f"database {name!r} already exists; drop it or pass --drop-existing")
            if exists:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            max_conn = scalar(conn.execute("SHOW max_connections").fetchone())
            in_use = scalar(conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone())
        with self._lock:
            self._databases.append((admin, name))
        log(f"  created PostgreSQL database {name} (max_connections {max_conn}, {in_use} in use now)")

    def analyze(self, url: str) -> None:
        """``ANALYZE`` the database ``url`` names, once its scenario is written.

        A scenario writes thousands of rows into empty tables and the run starts a second later,
        before autovacuum has looked at them: PostgreSQL then plans with the statistics of empty
        tables (one row per status) and, for example, found a redemption's session grant by scanning
        every active grant (the grant-status index, then a join filter) instead of by its primary
        key: twice the PostgreSQL CPU per redemption with 1,000 grants. A deployment holding that many
        rows has been analyzed by autovacuum long since; so is the benchmark's database before it runs.
        """
        import psycopg

        if not url.startswith(("postgres://", "postgresql://")):
            return  # SQLite plans without statistics of this kind
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("ANALYZE")
        log(f"  ANALYZE: {time.perf_counter() - started:.1f}s")

    def start_redis(self, name: str = "redis") -> str:
        """A private redis-server on a free port, without persistence; returns its URL."""
        if not shutil.which("redis-server"):
            raise SystemExit("redis-server not found: install it or pass --redis-url")
        port = free_port()
        proc = self.spawn(
            name,
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxclients",
                "10000",
            ],
            dict(os.environ),
            kind="redis",
            port=port,
        )

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        self.wait_until(proc, up, "redis-server", 30)
        url = f"redis://127.0.0.1:{port}/0"
        log(f"  redis-server on {url} (private)")
        return url


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def drop_database(admin: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        log(f"dropped PostgreSQL database {name}")
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the real outcome
        log(f"could not drop PostgreSQL database {name}: {exc}")


def check_database_url(
    parser: argparse.ArgumentParser, flag: str, url: str, *, reserved: Iterable[str] = ("countersign",)
) -> None:
    """argparse check: a postgres:// URL on loopback naming a database of its own."""
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql"):
        parser.error(f"{flag} must be a postgres:// URL")
    if parsed.hostname not in LOOPBACK:
        parser.error(f"{flag} must point at a loopback host (127.0.0.1, localhost, ::1)")
    if parsed.path.lstrip("/") in ("", "postgres", "template0", "template1", *reserved):
        parser.error(f"{flag} must name a dedicated benchmark database")


# --- serving --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """An application as both a WSGI and an ASGI callable ("module:attribute"), so that it can be
    served by whichever server program the project's web process uses."""

    wsgi: str
    asgi: str


COUNTERSIGN = App(wsgi="config.wsgi:application", asgi="config.asgi:application")


def _serving() -> ModuleType | None:
    """``config/serving.py`` if the project has one, else None. Loaded from its file, so the
    ``config`` package (which imports Celery) is not imported into the load generator."""
    path = ROOT / "config" / "serving.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_countersign_serving", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_web(
    stack: Stack,
    name: str,
    port: int,
    env: dict[str, str],
    *,
    app: App = COUNTERSIGN,
    workers: int = 1,
    kind: str = "web",
) -> Proc:
    """Start one web process serving HTTP on 127.0.0.1:``port``, the way production does.

    The command comes from ``config.serving.web_command(port, host=...)`` when that module exists,
    else it is today's ``uvicorn config.asgi:application``. ``workers`` is granian's worker count
    there (one web process each, on the one port) and travels as ``WEB_CONCURRENCY`` (uvicorn and
    gunicorn read it). For another ``app`` (the peers in
    peers.py) the command's Countersign target (``config.wsgi...`` or ``config.asgi...``) is
    replaced by the app's callable of the same interface, so the peer runs under the same server
    program with the same options. Readiness is not waited for here (see ``Stack.wait_http``).
    """
    host = "127.0.0.1"
    serving = _serving()
    if serving is not None:
        cmd = list(serving.web_command(port, host=host, workers=workers))
    else:
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            host,
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    if app != COUNTERSIGN:
        cmd = _retarget(cmd, app)
    env = {**env, "WEB_CONCURRENCY": str(workers)}
    log(f"  {name}: {_shown(cmd)}")
    return stack.spawn(name, cmd, env, kind=kind, port=port)


def start_ws(stack: Stack, name: str, port: int, env: dict[str, str]) -> Proc | None:
    """A websocket process, if ``config.serving.ws_command(port, host=...)`` says websockets are served
    apart from HTTP; None when the web process serves them too (then use its port)."""
    serving = _serving()
    if serving is None or not hasattr(serving, "ws_command"):
        return None
    cmd = list(serving.ws_command(port, host="127.0.0.1"))
    log(f"  {name}: {_shown(cmd)}")
    return stack.spawn(name, cmd, env, kind="ws", port=port)


def _shown(cmd: list[str]) -> str:
    return " ".join([Path(cmd[0]).name, *cmd[1:]])


def _retarget(cmd: list[str], app: App) -> list[str]:
    for i, arg in enumerate(cmd):
        for interface in ("wsgi", "asgi"):
            ours = getattr(COUNTERSIGN, interface)
            if arg in (ours, ours.split(":")[0]):
                return [*cmd[:i], getattr(app, interface), *cmd[i + 1 :]]
    raise SystemExit(
        f"cannot serve {app} the way the web process is served: no config.wsgi/config.asgi target in {cmd}"
    )


def start_celery_worker(
    stack: Stack,
    name: str,
    env: dict[str, str],
    *,
    concurrency: int,
    hostname: str,
    extra: Iterable[str] = (),
) -> Proc:
    serving = _serving()
    if serving is not None and hasattr(serving, "worker_command"):
        cmd = list(serving.worker_command(concurrency=concurrency, hostname=hostname, extra=tuple(extra)))
    else:  # a tree from before config.serving knew the worker's command line
        cmd = [str(BIN / "celery"), "-A", "config.celery:app", "worker", "--loglevel=INFO"]
        cmd += [f"--concurrency={concurrency}", "--without-mingle", "--without-gossip", *extra]
        cmd += ["--hostname", hostname]
    log(f"  {name}: {_shown(cmd)}")
    return stack.spawn(name, cmd, env, kind="worker")


def start_sealer(stack: Stack, env: dict[str, str]) -> Proc:
    """The audit sealer, as the Procfile runs it: audited writes only append; it links them."""
    return stack.spawn("sealer", [sys.executable, "manage.py", "audit_seal", "--loop"], env, kind="sealer")


def wait_celery_ready(stack: Stack, proc: Proc, limit: float = 120) -> None:
    stack.wait_until(
        proc, lambda: "ready." in stack.log_tail(proc.name, 100_000), f"celery {proc.name}", limit
    )


def celery_purge(stack: Stack, env: dict[str, str], *, quiet: bool = False) -> None:
    """Drop tasks left in the countersign queue (by an earlier run, or handed back by a stopped worker)."""
    cmd = [str(BIN / "celery"), "-A", "config.celery:app", "purge", "-f", "-Q", "countersign"]
    if not quiet:
        stack.run_step(cmd, env, "purge the countersign queue")
        return
    try:
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"could not purge the countersign queue: {exc}")


def run_main(main: Callable[[], int]) -> int:
    """Run a benchmark so that SIGTERM and SIGHUP unwind like Ctrl-C (every ``finally`` runs)."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # Also when started in the background, where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        log("interrupted")
        return 130


# --- small shared pieces ----------------------------------------------------------------------------


def basic(client_id: str, secret: str) -> str:
    """An HTTP Basic Authorization header value (RFC 6749 §2.3.1 client authentication)."""
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def jwt_header(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    header: dict[str, Any] = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return header


@dataclass
class Errors:
    """A count and the first few messages."""

    count: int = 0
    samples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.count += 1
        if len(self.samples) < 5:
            self.samples.append(text[:500])


class ConnectionMonitor:
    """Samples the number of PostgreSQL backends connected to a database (over one connection)."""

    def __init__(self, database_url: str) -> None:
        self.database_url, self.name = database_url, urlparse(database_url).path.lstrip("/")
        self.peak: dict[str, int] = {}
        self.phase = "idle"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.database_url, autocommit=True, connect_timeout=10) as conn:
                while not self._stop.wait(0.25):
                    n = (
                        scalar(
                            conn.execute(
                                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.name]
                            ).fetchone()
                        )
                        - 1
                    )  # not this monitor
                    self.peak[self.phase] = max(self.peak.get(self.phase, 0), n)
        except Exception as exc:  # noqa: BLE001 - a monitor must not break the run
            self.peak["monitor error"] = -1
            log(f"  (connection monitor stopped: {exc})")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# --- a lean HTTP/1.1 client for load generators --------------------------------------------------


class HttpResponse:
    """What the benchmarks read of a response: status, headers (lower-case names), body."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class StaleConnection(Exception):
    """A kept-alive connection the server had closed before this request reached it."""


class LeanHttp:
    """POSTs over kept-alive HTTP/1.1 connections to one loopback server, on asyncio streams.

    httpx costs a load generator more CPU per request than the server spends answering it (its
    pool, auth and stream layers; and without ``sniffio`` installed httpcore retries that import on
    every call), so a load generator built on it measures itself. This does only what the load
    phase needs: form-encoded POSTs with fixed headers, a response with Content-Length or chunked
    body, no redirects followed, no cookie jar. A request that finds its reused connection closed
    by the server before any response byte (the keep-alive race) is sent once more on a new
    connection and counted in ``resent``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
        max_idle: int = 1000,
    ) -> None:
        parsed = urlparse(base_url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.timeout, self.max_idle = timeout, max_idle
        self._head = "".join(
            f"{k}: {v}\r\n" for k, v in {"Host": f"{self.host}:{self.port}", **(headers or {})}.items()
        )
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.resent = 0

    async def post(
        self, path: str, *, data: dict[str, str] | None = None, headers: dict[str, str] | None = None
    ) -> HttpResponse:
        body = urlencode(data or {}).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        request = (
            f"POST {path} HTTP/1.1\r\n{self._head}{extra}Content-Type: application/x-www-form-urlencoded"
            f"\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        async with asyncio.timeout(self.timeout):
            if self._idle:
                try:
                    return await self._exchange(self._idle.pop(), request, reused=True)
                except StaleConnection:
                    self.resent += 1
            return await self._exchange(
                await asyncio.open_connection(self.host, self.port), request, reused=False
            )

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes, *, reused: bool
    ) -> HttpResponse:
        reader, writer = conn
        try:
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if reused and not getattr(exc, "partial", b""):
                    raise StaleConnection() from exc
                raise
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                content = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    chunks.append(await reader.readexactly(size + 2))
                    if size == 0:
                        break
                content = b"".join(c[:-2] for c in chunks)
            else:
                content = await reader.read()
                headers["connection"] = "close"
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close" or len(self._idle) >= self.max_idle:
            writer.close()
        else:
            self._idle.append(conn)
        return HttpResponse(status, headers, content)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()


class IdleInbox(asyncio.Protocol):
    """One idle inbox tab on a raw socket: the websocket handshake (RFC 6455 §4.1), the snapshot,
    then every frame read and dropped, pings answered, the server's close answered.

    A websocket client library spends about as much CPU per received frame as the server spends
    sending it (its reader task, message queue and per-frame objects): with 2,000 idle tabs on
    40 officers, each prompt, decision and redemption is a frame to ~50 tabs, and the load
    generator measured itself. This reads frame headers and skips payloads, so a frame costs a
    few slices of a buffer. ``lost`` resolves when the server drops the connection (its close
    frame, or the socket's end); ``ready`` once the snapshot frame arrived (or with the error).
    """

    def __init__(self, path: str, host: str, headers: dict[str, str]) -> None:
        self.key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            del self.buffer[: end + 4]
            if b" 101 " not in status:
                return self._end(f"handshake refused: {status.decode('latin-1')[:200]}")
            self.upgraded = True
        self._frames()

    def _frames(self) -> None:
        buf, at = self.buffer, 0
        while len(buf) - at >= 2:
            opcode, size, head = buf[at] & 0x0F, buf[at + 1] & 0x7F, 2
            if size == 126:
                if len(buf) - at < 4:
                    break
                size, head = int.from_bytes(buf[at + 2 : at + 4], "big"), 4
            elif size == 127:
                if len(buf) - at < 10:
                    break
                size, head = int.from_bytes(buf[at + 2 : at + 10], "big"), 10
            if len(buf) - at < head + size:
                break
            snapshot = opcode == 1 and not self.ready.done()  # the first text frame
            # Only the snapshot and control frames are read; every other payload is skipped uncopied.
            payload = bytes(buf[at + head : at + head + size]) if snapshot or opcode >= 8 else b""
            at += head + size
            if snapshot:
                kind = json.loads(payload).get("type")
                if kind == "snapshot":
                    self.ready.set_result(None)
                else:
                    self._end(f"expected a snapshot, got {kind}")
            elif opcode == 9:  # ping: the pong carries its payload (§5.5.3)
                self._send(0xA, payload)
            elif opcode == 8:  # the server closes: answer (§5.5.1) and wait for the socket's end
                self._send(0x8, payload[:2])
                self._end(f"closed by the server: {int.from_bytes(payload[:2], 'big') if payload else ''}")
        del buf[:at]

    def _send(self, opcode: int, payload: bytes) -> None:
        """A client frame: masked, as §5.3 requires (control frames carry at most 125 bytes)."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _end(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if not self.lost.done():
            self.lost.set_result(why)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc}" if exc else "connection closed")

    def close(self) -> None:
        """Close as a browser does: a close frame (1001, going away), then the socket."""
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x8, (1001).to_bytes(2, "big"))
            self.transport.close()


async def open_idle_inbox(ws_url: str, path: str, headers: dict[str, str], timeout: float) -> IdleInbox:
    """An ``IdleInbox`` on ``ws_url`` (``http://host:port``), once its snapshot has arrived."""
    parsed = urlparse(ws_url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    loop = asyncio.get_running_loop()
    _, tab = await asyncio.wait_for(
        loop.create_connection(lambda: IdleInbox(path, f"{host}:{port}", headers), host, port), timeout
    )
    try:
        await asyncio.wait_for(tab.ready, timeout)
    except BaseException:
        tab.close()
        raise
    return tab

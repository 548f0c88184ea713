"""Server CPU per request and requests/s of one Django view under several HTTP servers.

The figures behind docs/deployment.md's choice of server. Each candidate is one server process
(one worker) on loopback; ``wrk`` (apt install wrk) drives it; the server's CPU is the utime+stime
of its whole process group from /proc before and after each run, divided by the requests served.
Candidates run in interleaved rounds (order reversed every other round) and the medians are shown,
because the machine is shared.

    pip install 'gunicorn>=23,<24' 'a2wsgi>=1.10,<2'    # only for the comparison; not dependencies
    DATABASE_URL=postgres://... REDIS_URL=redis://.../11 .venv/bin/python scripts/measure_serving.py \
        --path /healthz --rounds 3 --duration 6s --connections 8

Candidates: (a) uvicorn + Django's ASGI handler, the old setup; (b) gunicorn sync worker, and
gthread with 8 threads; (c) granian --interface wsgi, 8 threads (config.serving.web_command);
(d) uvicorn with an ASGI router giving HTTP to Django's WSGI handler in a fixed 8-thread pool
(a2wsgi) and websockets to Channels.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config.serving import web_command  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
ROUTER_D = """
import os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
from a2wsgi import WSGIMiddleware
from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.core.asgi import get_asgi_application
get_asgi_application()
from django.core.wsgi import get_wsgi_application
from config.routing import websocket_urlpatterns
application = ProtocolTypeRouter({
    "http": WSGIMiddleware(get_wsgi_application(), workers=8),
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def candidates() -> dict[str, tuple[int, list[str]]]:
    py = sys.executable
    ports = {name: free_port() for name in ("a", "b", "b2", "c", "d")}
    return {
        "(a) uvicorn + Django ASGI": (
            ports["a"],
            [
                py,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--port",
                str(ports["a"]),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
        ),
        "(b) gunicorn sync, 1 worker": (
            ports["b"],
            [
                py,
                "-m",
                "gunicorn",
                "config.wsgi:application",
                "-b",
                f"127.0.0.1:{ports['b']}",
                "-w",
                "1",
                "--log-level",
                "warning",
            ],
        ),
        "(b) gunicorn gthread, 8 threads": (
            ports["b2"],
            [
                py,
                "-m",
                "gunicorn",
                "config.wsgi:application",
                "-b",
                f"127.0.0.1:{ports['b2']}",
                "-w",
                "1",
                "-k",
                "gthread",
                "--threads",
                "8",
                "--log-level",
                "warning",
            ],
        ),
        "(c) granian WSGI, 8 threads": (ports["c"], web_command(ports["c"], threads=8)),
        "(d) uvicorn + a2wsgi pool": (
            ports["d"],
            [
                py,
                "-m",
                "uvicorn",
                "serving_router_d:application",
                "--port",
                str(ports["d"]),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
        ),
    }


def group_cpu_seconds(pgid: int) -> float:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def wrk(url: str, duration: str, connections: int) -> tuple[int, float, str]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}", url], capture_output=True, text=True, check=True
    ).stdout
    errors = " ".join(m.group(0) for m in re.finditer(r"(Non-2xx or 3xx responses|Socket errors): .*", out))
    requests, rate = re.search(r"(\d+) requests in", out), re.search(r"Requests/sec:\s+([\d.]+)", out)
    if requests is None or rate is None:
        raise RuntimeError(f"wrk printed no totals: {out[-300:]}")
    return int(requests.group(1)), float(rate.group(1)), errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="6s")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt install wrk)")
    tmp = tempfile.mkdtemp()
    Path(tmp, "serving_router_d.py").write_text(ROUTER_D)
    env = {**os.environ, "PYTHONPATH": tmp, "LOG_LEVEL": "WARNING"}
    servers = candidates()
    procs = {}
    try:
        for name, (_, cmd) in servers.items():
            procs[name] = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for name, (port, _) in servers.items():
            url = f"http://127.0.0.1:{port}{args.path}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or procs[name].poll() is not None:
                    sys.exit(f"{name} did not answer 200 on {url}")
                time.sleep(0.2)
            wrk(url, "2s", args.connections)  # warm-up
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for r in range(args.rounds):
            for name in list(servers) if r % 2 == 0 else list(reversed(servers)):
                url = f"http://127.0.0.1:{servers[name][0]}{args.path}"
                before = group_cpu_seconds(procs[name].pid)
                n, rps, errors = wrk(url, args.duration, args.connections)
                cpu_ms = (group_cpu_seconds(procs[name].pid) - before) / n * 1000
                results[name].append((cpu_ms, rps))
                print(
                    f"round {r + 1} {name:34s} {cpu_ms:6.3f} ms CPU/request {rps:8.1f} req/s {errors}",
                    flush=True,
                )
        print(f"\n{args.path}: wrk -t1 -c{args.connections} -d{args.duration}, {args.rounds} rounds, medians")
        medians = {
            name: (statistics.median(c for c, _ in v), statistics.median(x for _, x in v))
            for name, v in results.items()
        }
        best = min(cpu for cpu, _ in medians.values())
        for name, (cpu, rps) in medians.items():
            print(f"| {name} | {cpu:.2f} ms | {cpu / best:.1f}x | {rps:,.0f} |")
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

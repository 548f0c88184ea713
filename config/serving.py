"""How Countersign's server processes are started: the one place that knows the command lines.

Two kinds of server process, because HTTP and websockets are best served by different servers
(docs/deployment.md has the measurements):

- **web** (HTTP, every page and protocol endpoint): granian with its WSGI interface,
  ``config.wsgi:application``, one worker process with a fixed pool of ``WEB_THREADS`` threads.
  One web process is "one core" in benchmarks.
- **ws** (websockets, ``/ws/``): uvicorn with ``config.asgi:application`` (Channels).

In production a load balancer sends ``/ws/`` to ws processes and everything else to web
processes. On one machine (``make run``, test fixtures) ``local`` starts one of each behind
``config.router``, so HTTP and websockets share one origin as they do behind the balancer.

Used from Python (tests, benchmarks)::

    from config.serving import web_command, ws_command, local_command, worker_command
    subprocess.Popen(web_command(8001), cwd=ROOT, env=env, start_new_session=True)

and from the shell (Procfile, systemd, scripts/run.sh)::

    python -m config.serving web --port 8001
    python -m config.serving ws --port 9001
    python -m config.serving local --port 8000
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Threads per web process. Requests block on PostgreSQL and Redis, so a few more threads than
# cores keep the core busy; each thread holds at most one pooled database connection.
WEB_THREADS = int(os.environ.get("WEB_THREADS", "8"))


def web_command(
    port: int,
    host: str = "127.0.0.1",
    *,
    threads: int | None = None,
    python: str | None = None,
    workers: int = 1,
) -> list[str]:
    """One HTTP server process (granian, WSGI) listening on ``host:port``.

    ``workers`` > 1 forks that many granian workers on the one port, each a web process of its own
    (its own interpreter, threads and connection pool): what a benchmark of "N cores" of the web
    tier runs. Deployments run one worker per process and scale by processes (``Procfile``)."""
    return [
        python or sys.executable,
        "-m",
        "granian",
        "--interface",
        "wsgi",
        "config.wsgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--blocking-threads",
        str(threads or WEB_THREADS),
        "--no-ws",
        "--respawn-failed-workers",
        "--log-level",
        "warning",
    ]


# The largest websocket message the ws server accepts at all (bytes): past it uvicorn closes the
# connection with 1009 before the application sees the frame (its default is 16 MiB). The inbox's
# own limit is smaller still (approvals.consumers.MAX_FRAME, also 1009).
WS_MAX_SIZE = int(os.environ.get("WS_MAX_SIZE", "4096"))


def ws_command(
    port: int, host: str = "127.0.0.1", *, python: str | None = None, ws_max_size: int | None = None
) -> list[str]:
    """One websocket server process (uvicorn, Channels) listening on ``host:port``.

    uvicorn trusts X-Forwarded-For/-Proto from FORWARDED_ALLOW_IPS (default 127.0.0.1), the same
    peers config.wsgi trusts. ``--ws-max-size`` bounds every frame (RFC 6455 §7.4.1: 1009).

    No permessage-deflate (RFC 7692): inbox frames are a few hundred bytes of JSON, and every
    prompt goes to every open tab of its user, so compressing each copy on each socket cost the
    server (and each browser) CPU per frame, plus zlib state held for every idle connection, to
    save a few hundred bytes on loopback-near links.
    """
    return [
        python or sys.executable,
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
        "--proxy-headers",
        # Channels' ProtocolTypeRouter has no lifespan handler; uvicorn would probe and complain.
        "--lifespan",
        "off",
        "--ws-max-size",
        str(ws_max_size or WS_MAX_SIZE),
        "--ws-per-message-deflate",
        "false",
        # websockets' sans-I/O protocol: timers instead of three tasks per connection, and a send
        # is a write to the transport (docs/deployment.md: about half the server CPU per frame).
        "--ws",
        "websockets-sansio",
    ]


def worker_command(
    *, concurrency: int, hostname: str, extra: tuple[str, ...] = (), python: str | None = None
) -> list[str]:
    """One Celery worker of ``config.celery:app`` (``--concurrency`` threads, config.celery), as
    tests and benchmarks start it: no mingle or gossip (nothing here needs workers to talk to each
    other), ``extra`` options before the node name (e.g. ``--without-heartbeat``)."""
    celery = str(Path(python or sys.executable).parent / "celery")
    return [
        celery,
        "-A",
        "config.celery:app",
        "worker",
        "--loglevel=INFO",
        f"--concurrency={concurrency}",
        "--without-mingle",
        "--without-gossip",
        *extra,
        "--hostname",
        hostname,
    ]


def local_command(port: int, host: str = "127.0.0.1", *, python: str | None = None) -> list[str]:
    """A web process, a ws process and the path router in front of them, on one ``host:port``."""
    return [python or sys.executable, "-m", "config.serving", "local", "--host", host, "--port", str(port)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """In a child: be sent SIGTERM if the launcher dies, even by SIGKILL (Linux), so no server lingers."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _local_threads() -> int:
    """WEB_THREADS when set; otherwise no more than granian's own ceiling (2 x cores + 1), past which
    it warns at start-up on a small machine."""
    if "WEB_THREADS" in os.environ:
        return WEB_THREADS
    return max(2, min(WEB_THREADS, (os.cpu_count() or 1) * 2 + 1))


def run_local(host: str, port: int) -> int:
    """Start web and ws on private loopback ports and route ``host:port`` to them until stopped.

    Signalling this process (or its group: Ctrl-C in a terminal) stops all three. Each child runs
    in a process group of its own, so a Ctrl-C reaches only this process, which then stops them one
    signal at a time: granian seeing its worker die of the terminal's SIGINT first would respawn it,
    and that worker could outlive everything. Whatever is left in a child's group is killed last.
    Returns when any child exits (1, so a supervisor sees the failure) or on SIGTERM/SIGINT (0).
    """
    from config.router import serve

    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop_requested.append(True))
    web_port, ws_port = _free_port(), _free_port()
    children = [
        subprocess.Popen(
            web_command(web_port, threads=_local_threads()), preexec_fn=_die_with_parent, process_group=0
        ),
        subprocess.Popen(ws_command(ws_port), preexec_fn=_die_with_parent, process_group=0),
    ]

    def alive() -> bool:
        return all(child.poll() is None for child in children)

    try:
        deadline = time.monotonic() + 120
        while not (_accepting(web_port) and _accepting(ws_port)):
            if stop_requested:
                return 0
            if not alive() or time.monotonic() > deadline:
                print("config.serving: a server process did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        if not serve(
            host,
            port,
            web=("127.0.0.1", web_port),
            ws=("127.0.0.1", ws_port),
            alive=alive,
            stopped=lambda: bool(stop_requested),
        ):
            print("config.serving: a server process exited", file=sys.stderr)
            return 1
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        # Less than the 10 s scripts/demo.sh and the test fixtures give the whole node.
        deadline = time.monotonic() + 8
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for child in children:  # a server's own workers, had any outlived it
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m config.serving", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["web", "ws", "local"])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--ws-max-size",
        type=int,
        default=WS_MAX_SIZE,
        help="ws: the largest websocket message accepted, in bytes (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.kind == "local":
        return run_local(args.host, args.port)
    if args.kind == "ws":
        command = ws_command(args.port, args.host, ws_max_size=args.ws_max_size)
    else:
        command = web_command(args.port, args.host)
    os.execv(command[0], command)  # the server replaces this process: one process, one pid to supervise
    return 1


if __name__ == "__main__":
    sys.exit(main())

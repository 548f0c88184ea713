"""A live Countersign stack for tests: the real servers as deployed (config.serving: granian for
HTTP, uvicorn for websockets, the path router in front so both share one origin) and a real
Celery worker, as subprocesses sharing the test's PostgreSQL database and Redis.

Use ``live_stack`` together with ``transactional_db`` so that rows the test writes are
committed and visible to the server and the worker.
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection
from pytest_django import DjangoDbBlocker, Settings

from config.serving import local_command, worker_command

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveStack:
    url: str
    env: dict[str, str]
    log_dir: Path

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def mark(self) -> dict[Path, int]:
        """Where each process's log ends now (``logs_since``): the stack lives for the whole session."""
        return {p: p.stat().st_size for p in self.log_dir.glob("*.log")}

    def logs_since(self, mark: dict[Path, int]) -> str:
        """What the processes logged after ``mark``, not what earlier tests made them log."""
        parts = []
        for p in sorted(self.log_dir.glob("*.log")):
            with p.open("rb") as fh:
                fh.seek(mark.get(p, 0))
                parts.append(f"--- {p.name}\n{fh.read().decode(errors='replace')}")
        return "\n".join(parts)

    def sweep(self) -> None:
        """Queue the expiry sweep for the stack's worker, as the beat does every APPROVAL_SWEEP_SECONDS."""
        from config.celery import app as celery_app

        celery_app.send_task("approvals.expire_due")


def _database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"] != "django.db.backends.postgresql":
        pytest.fail(
            "live-stack tests share the database with server processes: run them on PostgreSQL "
            "(make test sets DATABASE_URL)"
        )
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _wait(check: Callable[[], bool], what: str, stack: LiveStack, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not start within {timeout:.0f}s\n{stack.logs()}")


@contextlib.contextmanager
def start_stack(
    log_dir: Path, *, extra_env: dict[str, str] | None = None, worker: bool = True
) -> Iterator[LiveStack]:
    """A server (and a Celery worker) on a free port, stopped on exit. Call with the database unblocked."""
    database_url = _database_url()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "COUNTERSIGN_ISSUER": url,
        "SECRET_KEY": settings.SECRET_KEY,
        "REDIS_URL": settings.REDIS_URL,
        "COUNTERSIGN_SIGNING_KEY_CACHE_SECONDS": "0",  # tests flush the key table between tests
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    stack = LiveStack(url=url, env=env, log_dir=log_dir)
    procs = [
        subprocess.Popen(
            local_command(port),
            cwd=ROOT,
            env=env,
            stdout=open(log_dir / "server.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
    ]
    if worker:
        from config.celery import app as celery_app

        celery_app.control.purge()
        procs.append(
            subprocess.Popen(
                # No beat: a sweep running on its own would write while other tests truncate their
                # tables. A test that needs one queues it as the beat would (LiveStack.sweep).
                worker_command(concurrency=2, hostname=f"test-{port}@%h"),
                cwd=ROOT,
                env=env,
                stdout=open(log_dir / "celery.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def server_up() -> bool:
        try:
            return httpx.get(f"{url}/.well-known/oauth-authorization-server", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(server_up, "the web and ws servers", stack, timeout=90)
        if worker:
            _wait(lambda: "ready." in (log_dir / "celery.log").read_text(), "celery worker", stack)
        yield stack
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def live_stack(
    django_db_setup: None, django_db_blocker: DjangoDbBlocker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    with django_db_blocker.unblock():
        database_url = _database_url()  # noqa: F841  (fails early off PostgreSQL)
    with start_stack(tmp_path_factory.mktemp("live")) as stack:
        yield stack


def wait_for_idle_workers(timeout: float = 10.0) -> None:
    """Wait until no task is queued or in a worker's hands, so the flush after a test does not
    TRUNCATE under a task's open transaction (they deadlock; PostgreSQL kills one, and a killed
    flush leaves the test's rows to the next test). With ``acks_late`` a message stays in the
    Redis transport's ``unacked`` hash until its task has returned, so an empty queue and an empty
    hash mean every task has finished. Gives up quietly at ``timeout``: a task a test left waiting
    on a retry countdown is outside any transaction."""
    import redis

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not client.llen(queue) and not client.hlen("unacked"):
                return
            time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture
def live(live_stack: LiveStack, transactional_db: None, settings: Settings) -> Iterator[LiveStack]:
    """The live stack, with this process issuing tokens under the live server's issuer. On the way
    out (before ``transactional_db`` flushes the tables) it waits for the worker to finish."""
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "ISSUER": live_stack.url}
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": live_stack.url}
    yield live_stack
    wait_for_idle_workers()

"""scripts/run.sh (make run): a busy port is named before anything starts, start-up is quiet, and
Ctrl-C is a clean stop (exit 0)."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from tests.live import ROOT, free_port

pytestmark = pytest.mark.django_db(transaction=True)


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{tmp_path}/run.sqlite3",
        "REDIS_URL": settings.REDIS_URL,
        "PYTHONUNBUFFERED": "1",
    }


def test_busy_port_is_refused_with_how_to_pick_another(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            ["scripts/run.sh"], cwd=ROOT, env=_env(tmp_path, port), capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert f"Port {port}" in result.stderr and "PORT=" in result.stderr
    assert "running at" not in result.stdout


def test_starts_without_warnings_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, port)
    subprocess.run(
        [str(ROOT / ".venv/bin/python"), "manage.py", "migrate", "-v0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(
        ["scripts/run.sh"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/accounts/login/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("make run did not come up:\n" + (tmp_path / "run.log").read_text())
        httpx.get(f"http://127.0.0.1:{port}/static/countersign/app.css", timeout=5)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "run.log").read_text()
    assert "is running at" in output and "Stopped." in output
    for noise in ("WARNING", "lifespan", "StreamingHttpResponse", "Traceback", "address already in use"):
        assert noise not in output, output


def test_static_files_under_asgi_are_served_without_a_warning(tmp_path: Path) -> None:
    # The ws process (uvicorn, config.asgi) also answers plain HTTP when asked; a static file is a
    # synchronous FileResponse, which Django under ASGI warns about unless it is streamed async.
    port = free_port()
    env = _env(tmp_path, port)
    log = open(tmp_path / "ws.log", "w+")
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/python"), "-m", "config.serving", "ws", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/static/countersign/app.css", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    pytest.fail("the ws server did not start:\n" + (tmp_path / "ws.log").read_text())
                time.sleep(0.2)
        assert response.status_code == 200
        assert response.content == (ROOT / "static/countersign/app.css").read_bytes()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert "Warning" not in (tmp_path / "ws.log").read_text()

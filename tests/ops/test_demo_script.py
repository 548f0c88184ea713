"""scripts/demo.sh (make demo): Ctrl-C is the normal way to end it, so it exits 0."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings

from tests.live import ROOT, free_port

pytestmark = pytest.mark.django_db(transaction=True)

# The demo's systems and the agent's callback listen on fixed ports (seed_demo's audiences).
DEMO_PORTS = (8101, 8102, 8103, 8104, 8105, 8199)


def _busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_demo_and_exits_0(tmp_path: Path) -> None:
    busy = [p for p in DEMO_PORTS if _busy(p)]
    if busy:
        pytest.skip(f"the demo's fixed ports are in use on this machine: {busy}")
    env = {
        **os.environ,
        "PORT": str(free_port()),
        "DEMO_DIR": str(tmp_path / "demo"),
        "DEMO_OPEN": "0",
        "DATABASE_URL": f"sqlite:///{tmp_path}/demo.sqlite3",
        "REDIS_URL": settings.REDIS_URL,
        "PYTHONUNBUFFERED": "1",
    }
    out = open(tmp_path / "demo.out", "w+")
    proc = subprocess.Popen(
        ["scripts/demo.sh"],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # As from a terminal: a suite started as a background job of a shell without job control
        # inherits SIGINT ignored, and bash cannot trap a signal that was ignored on entry.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 180
        while "/o/authorize/" not in (tmp_path / "demo.out").read_text():  # the agent waits for consent
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "the demo did not get to the consent link:\n" + (tmp_path / "demo.out").read_text()
                )
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(timeout=60) == 0, (tmp_path / "demo.out").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "demo.out").read_text()
    assert "Stopped." in output and "Traceback" not in output
    assert not [p for p in DEMO_PORTS if _busy(p)], "a demo process outlived Ctrl-C"

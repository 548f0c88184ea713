"""README.md, followed literally: its shell blocks run, in order, in a real bash. The walkthrough
(against a live server, browser steps in Chromium) is in tests/browser/test_readme_walkthrough.py.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from consent.models import ResourceServer, ScopePolicy
from tests.live import ROOT

README = ROOT / "README.md"
DEMO_PASSWORD = "countersign-demo"


def shell_blocks(section: str) -> list[str]:
    """The ```sh blocks of one ``## section`` of README.md, in order."""
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start : end if end != -1 else None], re.S)


class Shell:
    """One reader's shell: each block runs in bash (set -e), and the variables and functions it
    defines carry over to the next block, as they would in one terminal."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.state = cwd / ".shell-state"
        self.state.write_text("")

    def run(self, block: str) -> str:
        names = sorted(set(re.findall(r"^\s*([A-Z_]+)=", block, re.M)))
        save = "".join(f"declare -p {n} >> {self.state}.new 2>/dev/null || true\n" for n in names)
        script = (
            f"set -euo pipefail\nsource {self.state}\n{block}\n"
            f"cp {self.state} {self.state}.new\n{save}"
            f"declare -f >> {self.state}.new\nmv {self.state}.new {self.state}\n"
        )
        result = subprocess.run(
            ["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (
            f"README block failed:\n{block}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
        return result.stdout


def _reader_dir(tmp_path: Path) -> Path:
    """A checkout as the reader has it (the virtualenv, manage.py), without writing into ours."""
    for name in (".venv", "manage.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra, "PYTHONPATH": str(ROOT), "COUNTERSIGN_DEMO_PASSWORD": DEMO_PASSWORD}
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return env


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("with_demo", [False, True], ids=["fresh database", "next to the demo data"])
def test_administration_block_as_written(tmp_path: Path, with_demo: bool) -> None:
    (block,) = shell_blocks("Administration")
    env = _env({"DATABASE_URL": f"sqlite:///{tmp_path}/admin.sqlite3"})
    cwd = _reader_dir(tmp_path)
    subprocess.run(
        [".venv/bin/python", "manage.py", "migrate", "-v0"], cwd=cwd, env=env, check=True, timeout=300
    )
    if with_demo:
        subprocess.run(
            [".venv/bin/python", "manage.py", "seed_demo"],
            cwd=cwd,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
    out = Shell(cwd, env).run(block)
    assert "client_secret" in out
    if with_demo:  # the demo's own records are as seed_demo made them
        import sqlite3

        db = sqlite3.connect(tmp_path / "admin.sqlite3")
        (audience,) = db.execute(
            f"SELECT audience FROM {ScopePolicy._meta.db_table} WHERE name = 'ledger:write'"
        ).fetchone()
        assert audience == "http://127.0.0.1:8105"
        assert db.execute(f"SELECT COUNT(*) FROM {ResourceServer._meta.db_table}").fetchone() == (
            7,
        )  # five systems, the MCP server, Payments

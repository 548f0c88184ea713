"""python -m countersign hash: the action hash a reader can compute in a shell."""

import json
import subprocess
import sys

from approvals.rar import action_hash
from tests.approvals.conftest import LEDGER_ENTRY


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "countersign", "hash", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_hash_matches_the_servers_action_hash_from_argument_and_stdin() -> None:
    text = json.dumps([LEDGER_ENTRY])
    assert _run(text).stdout.strip() == action_hash([LEDGER_ENTRY])
    assert _run(stdin=text).stdout.strip() == action_hash([LEDGER_ENTRY])


def test_hash_refuses_what_is_not_authorization_details() -> None:
    for bad in ("not json", "[1, 2]", "[" * 5000):
        result = _run(bad)
        assert result.returncode == 2 and result.stdout == "" and result.stderr

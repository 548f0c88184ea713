"""Refused websocket handshakes, black-box: each is refused before accept, the first of its
kind from a source in a minute is audited, every one is counted."""

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from audit.models import AuditEvent
from tests.limits.conftest import refusals
from tests.live import LiveStack


def _handshake(live: LiveStack, *, origin: str, cookie: str = "") -> int:
    headers = {"Origin": origin, **({"Cookie": cookie} if cookie else {})}
    with pytest.raises(InvalidStatus) as refused:
        connect(live.url.replace("http", "ws") + "/ws/approvals/", additional_headers=headers, open_timeout=5)
    return refused.value.response.status_code


@pytest.mark.parametrize(("reason", "origin"), [("bad_origin", "http://evil.example"), ("no_session", None)])
def test_refused_handshakes_leave_one_audit_row_and_are_counted(
    live: LiveStack, reason: str, origin: str | None
) -> None:
    before = refusals().get(f"ws_handshake:{reason}", 0)
    statuses = [_handshake(live, origin=origin or live.url) for _ in range(20)]
    assert set(statuses) == {403}
    rows = AuditEvent.objects.filter(event="websocket.refused", error=reason)
    assert rows.count() == 1
    assert rows.get().outcome == AuditEvent.Outcome.REFUSED and rows.get().remote_addr == "127.0.0.1"
    assert rows.get().detail["path"] == "/ws/approvals/"
    assert refusals()[f"ws_handshake:{reason}"] - before == 20

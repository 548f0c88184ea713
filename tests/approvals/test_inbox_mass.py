"""Hundreds of inbox websockets opening and closing at once, against the real servers (ws: uvicorn +
channels_redis): every one gets its snapshot, and the server logs no error while they all go."""

import asyncio
import json
import re

import pytest
from django.test import Client
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Scenario
from tests.live import LiveStack

pytestmark = [pytest.mark.django_db(transaction=True)]

SOCKETS = 300
ERRORS = re.compile(r"Traceback|MaxConnectionsError|Too many connections|ERROR|Exception")


async def _open(url: str, cookie: str, origin: str) -> ClientConnection:
    ws = await connect(
        url,
        additional_headers={"Cookie": cookie, "Origin": origin},
        open_timeout=60,
        close_timeout=30,
        max_queue=None,
    )
    snapshot = json.loads(await asyncio.wait_for(ws.recv(), 60))
    assert snapshot["type"] == "snapshot"
    return ws


async def _storm(url: str, cookie: str, origin: str) -> int:
    sockets = await asyncio.gather(*(_open(url, cookie, origin) for _ in range(SOCKETS)))
    await asyncio.gather(*(ws.close() for ws in sockets))
    return len(sockets)


def test_hundreds_of_sockets_close_at_once_without_errors(live: LiveStack, scenario: Scenario) -> None:
    client = Client()
    client.force_login(scenario.user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    log = live.log_dir / "server.log"  # the web, ws and router processes of config.serving local
    start = log.stat().st_size

    def written() -> str:
        with open(log) as f:
            f.seek(start)
            return f.read()

    try:
        opened = asyncio.run(_storm(live.url.replace("http", "ws") + "/ws/approvals/", cookie, live.url))
    except Exception as exc:
        pytest.fail(f"{exc!r}\n{written()[-6000:]}")
    assert opened == SOCKETS
    # disconnect handlers run after the close handshake: give the server a moment to finish them
    asyncio.run(asyncio.sleep(3))
    assert not ERRORS.search(written()), written()[-6000:]

"""Pushed frames skip Channels' session wrapper around ``send`` (``approvals.consumers._frame_send``)."""

from typing import Any

from channels.sessions import InstanceSessionWrapper

from approvals.consumers import _frame_send


async def server_send(message: dict[str, Any]) -> None:
    """Stands for the ASGI server's own send."""


def wrapped(send: Any) -> Any:
    scope: Any = {"type": "websocket", "cookies": {}}  # all the wrapper reads of a scope
    return InstanceSessionWrapper(scope, send).send


def test_the_servers_send_beneath_one_session_wrapper() -> None:
    assert _frame_send(wrapped(server_send)) is server_send


def test_the_servers_send_beneath_nested_session_wrappers() -> None:
    assert _frame_send(wrapped(wrapped(server_send))) is server_send


def test_a_send_without_a_session_wrapper_is_kept() -> None:
    assert _frame_send(server_send) is server_send

    class Other:
        async def send(self, message: dict[str, Any]) -> None: ...

    other = Other().send
    assert _frame_send(other) is other

"""Step-up approvals inside MCP tool calls, for servers built with the official ``mcp`` SDK (FastMCP).

.. code-block:: python

    mcp = FastMCP("Ledger", streamable_http_path="/mcp")
    step_up = StepUp(verifier)          # the verifier of the app's CountersignMiddleware

    @mcp.tool()
    @step_up("ledger:write")
    async def ledger_append(amount: str, currency: str, vendor: str, purchase_order: str) -> str:
        ...                             # runs only once the user approved exactly these arguments

What the decorator does on each call (``countersign.stepup``):

1. takes the session token the MCP client presented (the ``Authorization`` header of the
   Streamable HTTP request; ``CountersignMiddleware`` verified it already);
2. opens an approval for exactly this call, RFC 9396 ``authorization_details``
   ``[{"type": "mcp_tool_call", "server": <audience>, "tool": <name>, "arguments": {...}}]``
   (arguments as the tool received them: write amounts as strings);
3. while the user decides, sends MCP progress notifications (when the client asked for them with a
   ``progressToken``) and a log message naming the approval page, and offers that page as a URL
   elicitation (MCP ``elicitation/create``, mode ``url``) when the client declared that capability;
4. collects the action token, verifies it against the call and redeems it once, then runs the tool.

Denial, expiry, revocation of the session, or no answer within the approval window end the call
with a tool error (``isError``) that says which; it never hangs past the window.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
import typing
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from mcp.server.fastmcp import Context
from mcp.server.fastmcp.exceptions import ToolError

from .errors import (
    ApprovalDenied,
    ApprovalError,
    ApprovalExpired,
    ApprovalTimeout,
    CountersignError,
    GrantRevoked,
)
from .stepup import PendingApproval, StepUpClient
from .verifier import TokenVerifier, VerifiedToken, parse_authorization

__all__ = ["MCP_TOOL_CALL", "StepUp", "approved_call"]

MCP_TOOL_CALL = "mcp_tool_call"
_CTX = "countersign_mcp_context"
Tool = TypeVar("Tool", bound=Callable[..., Awaitable[Any]])

#: Inside a step-up tool: the redeemed action token (who approved, the approval id in ``claims``).
approved_call: ContextVar[VerifiedToken | None] = ContextVar("countersign_approved_call", default=None)


def _presented_token(ctx: Context[Any, Any, Any]) -> str:
    request = ctx.request_context.request
    headers = getattr(request, "headers", None)
    if headers is None:
        raise ToolError("This tool needs the session token of an HTTP request (Streamable HTTP transport).")
    try:
        _, token = parse_authorization(headers.get("authorization"))
    except CountersignError as exc:
        raise ToolError(f"No usable access token: {exc.description}") from exc
    return token


def _supports_url_elicitation(ctx: Context[Any, Any, Any]) -> bool:
    params = ctx.request_context.session.client_params
    elicitation = params.capabilities.elicitation if params is not None else None
    return elicitation is not None and elicitation.url is not None


def _refusal_message(exc: ApprovalError) -> str:
    if isinstance(exc, ApprovalDenied):
        return "The user denied this action in Countersign; nothing was done."
    if isinstance(exc, ApprovalExpired | ApprovalTimeout):
        return "The approval request expired before the user answered; nothing was done."
    if isinstance(exc, GrantRevoked):
        return f"The session was revoked or ended ({exc.description or exc.error}); nothing was done."
    return f"The approval could not be requested ({exc.error}: {exc.description}); nothing was done."


class StepUp:
    """Mark FastMCP tools as needing the user's approval of each call (see the module docstring).

    ``verifier`` needs this server's resource-server credentials; its ``audience`` names the server
    in the approved call. ``poll_seconds`` caps the pause between polls (the server's interval
    still applies)."""

    def __init__(self, verifier: TokenVerifier, *, poll_seconds: float = 5.0) -> None:
        self.verifier = verifier
        self.client = StepUpClient(verifier)
        self.poll_seconds = poll_seconds

    def details(self, tool: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"type": MCP_TOOL_CALL, "server": self.verifier.audience, "tool": tool, "arguments": arguments}
        ]

    def __call__(self, scope: str, *, binding_message: str = "") -> Callable[[Tool], Tool]:
        def decorator(fn: Tool) -> Tool:
            return self._wrap(fn, scope, binding_message)

        return decorator

    async def _wait(self, ctx: Context[Any, Any, Any], pending: PendingApproval) -> str:
        interval = float(pending.interval)
        deadline = pending.opened_at + pending.expires_in + 5
        while True:
            token, next_interval = await asyncio.to_thread(self.client.poll, pending)
            if token is not None:
                return token
            interval = max(1.0, float(next_interval))  # the server's interval, raised on slow_down
            waited = time.monotonic() - pending.opened_at
            if time.monotonic() + interval > deadline:
                raise ApprovalTimeout("timeout", "no answer within the approval window")
            await ctx.report_progress(
                waited,
                float(pending.expires_in),
                f"Waiting for your approval in Countersign: {pending.approval_uri}",
            )
            await asyncio.sleep(interval)

    async def _offer_page(self, ctx: Context[Any, Any, Any], pending: PendingApproval, tool: str) -> None:
        await ctx.info(f"{tool} needs your approval: open {pending.approval_uri} to approve or deny it.")
        if _supports_url_elicitation(ctx):
            await ctx.elicit_url(
                f"Approve or deny {tool} in Countersign", pending.approval_uri, secrets.token_urlsafe(12)
            )

    def _wrap(self, fn: Tool, scope: str, binding_message: str) -> Tool:
        tool = fn.__name__
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)

        async def wrapper(**kwargs: Any) -> Any:
            ctx: Context[Any, Any, Any] = kwargs.pop(_CTX)
            details = self.details(tool, dict(kwargs))
            token = _presented_token(ctx)
            offer: asyncio.Task[None] | None = None
            try:
                pending = await asyncio.to_thread(
                    self.client.open, token, scope=scope, details=details, binding_message=binding_message
                )
                offer = asyncio.create_task(self._offer_page(ctx, pending, tool))
                action_token = await self._wait(ctx, pending)
                verified = await asyncio.to_thread(
                    self.verifier.verify_action, action_token, expected_details=details, redeem=True
                )
            except ApprovalError as exc:
                raise ToolError(_refusal_message(exc)) from exc
            except CountersignError as exc:
                raise ToolError(f"The approval could not be used ({exc.error}: {exc.description}).") from exc
            finally:
                if offer is not None and not offer.done():
                    offer.cancel()
            reset = approved_call.set(verified)
            try:
                return await fn(**kwargs)
            finally:
                approved_call.reset(reset)

        params = [
            *signature.parameters.values(),
            inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=Context),
        ]
        setattr(wrapper, "__signature__", signature.replace(parameters=params))  # noqa: B010
        wrapper.__annotations__ = {**hints, _CTX: Context}
        wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = tool, fn.__qualname__, fn.__doc__
        return typing.cast(Tool, wrapper)

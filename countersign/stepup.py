"""Step-up a resource server opens itself, for the session token it was handed.

The resource server (an MCP server about to run a sensitive tool) asks the authorization
server for the user's approval of exactly the call it will make, with its own credentials
(HTTP Basic, RFC 6749 §2.3.1) and the agent's token as the login hint (OpenID CIBA Core
§7.1, at the server's ``resource_server_approval_endpoint``). It then polls
``resource_server_approval_token_endpoint`` (CIBA §10.1, §11 answers) for the one-shot
action token, which it verifies against the call and redeems once
(:meth:`TokenVerifier.verify_action`): the agent never holds it.

.. code-block:: python

    stepup = StepUpClient(verifier)
    pending = stepup.open(token, scope="ledger:write", details=[call])
    action_token = stepup.wait(pending)          # ApprovalDenied / ApprovalExpired / GrantRevoked
    verifier.verify_action(action_token, expected_details=[call])   # redeemed, once
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import (
    ApprovalDenied,
    ApprovalError,
    ApprovalExpired,
    ApprovalTimeout,
    GrantRevoked,
    ServiceUnavailable,
)
from .verifier import TokenVerifier

__all__ = ["PendingApproval", "StepUpClient"]


@dataclass(frozen=True)
class PendingApproval:
    auth_req_id: str
    expires_in: int
    interval: int
    #: Where the user answers (the inbox): what an MCP server offers as a URL elicitation.
    approval_uri: str
    opened_at: float  # monotonic


class StepUpClient:
    """Open and collect resource-server step-ups through a :class:`TokenVerifier` (its credentials,
    its HTTP client and its RFC 8414 metadata)."""

    def __init__(self, verifier: TokenVerifier) -> None:
        if verifier.client_id is None:
            raise ValueError("the verifier needs this resource server's client_id and client_secret")
        self.verifier = verifier

    def _post(self, endpoint: str, data: dict[str, str]) -> tuple[int, dict[str, Any]]:
        return self.verifier._post_form(endpoint, data, what="the authorization server")

    def open(
        self, token: str, *, scope: str, details: Sequence[Mapping[str, Any]], binding_message: str = ""
    ) -> PendingApproval:
        """Ask for the user's approval of ``details`` (RFC 9396) under ``scope``, for ``token``'s user."""
        data = {"token": token, "scope": scope, "authorization_details": json.dumps(list(details))}
        if binding_message:
            data["binding_message"] = binding_message
        status, body = self._post("resource_server_approval_endpoint", data)
        if status != 200 or not isinstance(body.get("auth_req_id"), str):
            error, description = str(body.get("error") or status), str(body.get("error_description") or "")
            if status >= 500 or error == "invalid_client":
                raise ServiceUnavailable(f"the approval could not be opened: {error} {description}".strip())
            if error == "access_denied":
                raise GrantRevoked(error, description, status_code=status)
            raise ApprovalError(error, description, status_code=status)
        return PendingApproval(
            auth_req_id=body["auth_req_id"],
            expires_in=int(body.get("expires_in") or 0),
            interval=max(1, int(body.get("interval") or 5)),
            approval_uri=str(body.get("approval_uri") or ""),
            opened_at=time.monotonic(),
        )

    def poll(self, pending: PendingApproval) -> tuple[str | None, int]:
        """One poll: (action token, next interval); (None, interval) while the user has not answered."""
        status, body = self._post(
            "resource_server_approval_token_endpoint", {"auth_req_id": pending.auth_req_id}
        )
        if status == 200 and isinstance(body.get("access_token"), str):
            return body["access_token"], pending.interval
        error, description = str(body.get("error") or status), str(body.get("error_description") or "")
        if error == "authorization_pending":
            return None, pending.interval
        if error == "slow_down":
            return None, pending.interval + 5
        kwargs: dict[str, Any] = {"status_code": status, "auth_req_id": pending.auth_req_id}
        if error == "expired_token":
            raise ApprovalExpired(error, description or "the approval window passed", **kwargs)
        if error == "access_denied" and any(
            w in description for w in ("cancelled", "ended", "no longer active")
        ):
            raise GrantRevoked(error, description, **kwargs)
        if error == "access_denied":
            raise ApprovalDenied(error, description or "the user denied this action", **kwargs)
        if status >= 500:
            raise ServiceUnavailable(f"the approval could not be collected: {error} {description}".strip())
        raise GrantRevoked(error, description, **kwargs)

    def wait(
        self,
        pending: PendingApproval,
        *,
        on_wait: Callable[[float], None] | None = None,
        timeout: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> str:
        """Poll until the action token, a refusal, or the window's end (never longer: no hang).
        ``on_wait(seconds waited)`` is called before each pause."""
        deadline = pending.opened_at + (timeout if timeout is not None else pending.expires_in + 5)
        interval = pending.interval
        while True:
            token, interval = self.poll(PendingApproval(**{**pending.__dict__, "interval": interval}))
            if token is not None:
                return token
            now = time.monotonic()
            if now + interval > deadline:
                raise ApprovalTimeout(
                    "timeout", "no answer within the approval window", auth_req_id=pending.auth_req_id
                )
            if on_wait is not None:
                on_wait(now - pending.opened_at)
            sleep(interval)

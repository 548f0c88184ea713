"""Step-up opened by a resource server, for the session token it was handed (an MCP tool call).

A resource server about to run a sensitive action (an MCP server's tool) asks for the user's
approval itself, rather than telling the agent to. It is a CIBA request (OpenID CIBA Core
§7.1) with these differences:

- the client is the resource server, authenticated with its own credentials (HTTP Basic,
  RFC 6749 §2.3.1); the ``login_hint_token`` is the agent's session token it was handed
  (``token``), which must be addressed to it (``aud``, RFC 8707) and live;
- the user and the session grant are the token's, the agent its ``act`` (RFC 8693 §4.1); the
  scope must be a step-up scope the agent registered, the user consented to, and whose audience
  is this resource server;
- ``authorization_details`` (RFC 9396) is exactly the call about to be made, e.g.
  ``{"type": "mcp_tool_call", "server": ..., "tool": "ledger_append", "arguments": {...}}``;
- only that resource server collects the action token
  (``POST /o/rs-approvals/token/`` with the ``auth_req_id``, answered as CIBA §11), and redeems it
  once at ``/o/redeem/``: the agent never holds it, and cannot change the arguments after approval.

The prompt reaches the user like any other (``approvals.services.approval_request_create``: the
same caps, collapsing, delivery, expiry, and cancellation when the grant ends).
"""

import copy
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from audit.services import audit_refusal
from consent.conf import countersign_settings
from consent.errors import OAuthError
from consent.http import NO_STORE, ProtocolView, error_response
from consent.models import ResourceServer
from consent.tokens import SESSION_TOKEN_TYP, TokenInvalid, verify
from consent.views.rs_auth import resource_server_or_refusal

from .ciba import read_login_hint, validate_backchannel_request
from .errors import InvalidRequest, InvalidScope, InvalidToken
from .models import ApprovalRequest
from .services import approval_collect, approval_request_create, auth_req_id_for

NOT_AUDITED = {"authorization_pending"}


def _request_params(post: Any) -> dict[str, str]:
    return {
        name: post.get(name, "")
        for name in ("scope", "authorization_details", "binding_message", "requested_expiry")
        if post.get(name, "") != ""
    }


def open_for_token(
    *, rs: ResourceServer, token: str, params: dict[str, str], request: HttpRequest | None = None
) -> tuple[ApprovalRequest, bool]:
    """Validate and create the approval (see the module docstring). Raises ``OAuthError``."""
    if not token:
        raise InvalidRequest("token (the session token the agent presented) is required")
    try:
        verify(token, typ=SESSION_TOKEN_TYP, audience=rs.audience)
    except TokenInvalid as exc:
        raise InvalidToken(f"the token is not a live session token for this resource server ({exc})") from exc
    scopes = params.get("scope", "").split()
    hint = read_login_hint(token, scopes[0] if len(scopes) == 1 else "")
    if hint is None:
        raise InvalidToken("the session token has been revoked")
    if hint.policy is not None and hint.policy.audience != rs.audience:
        raise InvalidScope(f"{scopes[0]} is not a scope of this resource server")
    # The resource server polls for itself: no ping to the agent's notification endpoint.
    agent = copy.copy(hint.agent)
    agent.backchannel_client_notification_endpoint = ""
    req = validate_backchannel_request(agent=agent, params={**params, "login_hint_token": token}, hint=hint)
    return approval_request_create(req=req, request=request, opened_by=rs)


class ResourceServerApprovalView(ProtocolView):
    """``POST /o/rs-approvals/``: a resource server opens an approval for a token it was handed."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        rs, refusal = resource_server_or_refusal(request, event="rs_approval.refused")
        if refusal is not None:
            return refusal
        assert rs is not None  # no refusal: the resource server authenticated
        params = _request_params(request.POST)
        try:
            approval, _ = open_for_token(
                rs=rs, token=request.POST.get("token", ""), params=params, request=request
            )
        except OAuthError as exc:
            audit_refusal(
                event="rs_approval.refused",
                error=exc.error,
                actor=f"rs:{rs.client_id}",
                client_id=rs.client_id,
                request=request,
                detail={"reason": exc.description or exc.reason, "scope": params.get("scope", "")},
            )
            return error_response(exc)
        remaining = max(1, int((approval.expires_at - timezone.now()).total_seconds()))
        return JsonResponse(
            {
                "auth_req_id": auth_req_id_for(approval.pk),
                "expires_in": remaining,
                "interval": approval.interval,
                "approval_uri": f"{countersign_settings.ISSUER}/approvals/",
            },
            headers=NO_STORE,
        )


class ResourceServerCollectView(ProtocolView):
    """``POST /o/rs-approvals/token/``: the resource server that opened it collects the action token
    (CIBA §10.1 answers: ``authorization_pending``, ``slow_down``, ``access_denied``, ``expired_token``)."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        rs, refusal = resource_server_or_refusal(request, event="rs_approval.refused")
        if refusal is not None:
            return refusal
        assert rs is not None  # no refusal: the resource server authenticated
        try:
            body = approval_collect(auth_req_id=request.POST.get("auth_req_id", ""), resource_server=rs)
        except OAuthError as exc:
            if exc.error not in NOT_AUDITED:
                audit_refusal(
                    event="rs_approval.collect_refused",
                    error=exc.error,
                    actor=f"rs:{rs.client_id}",
                    client_id=rs.client_id,
                    request=request,
                    detail={"reason": exc.description or exc.reason},
                )
            return error_response(exc)
        return JsonResponse(body, headers=NO_STORE)

"""The user's inbox and decisions, and the agent- and resource-server-facing endpoints."""

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from audit.decorators import post_only
from audit.services import audit_refusal, client_ip
from consent.conf import countersign_settings
from consent.errors import InvalidClient, OAuthError
from consent.http import (
    NO_STORE,
    AuthenticatedHttpRequest,
    ProtocolJsonResponse,
    ProtocolView,
    claimed_client_id,
    error_response,
    form_values,
)
from consent.instances import instance_admit
from consent.limits import attempts
from consent.models import Agent
from consent.oauth import client_auth
from consent.oauth.attestation import InstanceProof
from consent.views.account import SESSION_AMR, SESSION_AUTH_TIME, auth_context
from consent.views.rs_auth import resource_server_or_refusal

from .activity import END_REASONS, approver_names
from .ciba import LoginHint, read_login_hint, validate_backchannel_request
from .errors import ApprovalNotFound, ApprovalNotPending, VoteRefused
from .models import ApprovalRequest
from .notify.views import deliveries_by_approval
from .notify.webpush import vapid_key
from .quorum import Quorum, pending_for_approver, quorums_for, standing, waiting_words
from .receipts import receipt_for_download, receipt_from_redemption
from .redemption import action_token_spend
from .selectors import Decision, approval_for_decision, history_for_user, pending_for_user
from .services import (
    action_token_redeemed_announce,
    approval_approve,
    approval_audit_refused_decision,
    approval_deny,
    approval_request_create,
    auth_req_id_for,
)
from .votes import approval_vote_refused
from .wording import approve_gives, auth_words, status_words


@login_required
def inbox_view(request: AuthenticatedHttpRequest, status: int = 200) -> HttpResponse:
    # The person's own requests, and other people's they may vote on (two-person approval).
    pending = sorted(
        [*pending_for_user(user=request.user), *pending_for_approver(user_id=request.user.pk)],
        key=lambda a: a.created,
    )
    quorums = quorums_for(pending)
    history = [_with_how(a) for a in history_for_user(user=request.user)]
    reached = deliveries_by_approval([a.pk for a in history])
    for a in history:
        a.reached = reached.get(str(a.pk), [])  # type: ignore[attr-defined]  # what the history row shows
    return render(
        request,
        "approvals/inbox.html",
        {
            "pending": [(_with_gives(a), _standing(a, quorums[a.pk], request.user.pk)) for a in pending],
            "history": history,
            "vapid_public_key": vapid_key().public_key if countersign_settings.PUSH_ENABLED else "",
        },
        status=status,
    )


def _standing(approval: ApprovalRequest, quorum: Quorum | None, viewer_id: int) -> dict[str, Any] | None:
    if quorum is None:
        return None
    state = standing(approval=approval, quorum=quorum, viewer_id=viewer_id)
    return {**state, "waiting": waiting_words(state)}


def _with_gives(approval: ApprovalRequest) -> ApprovalRequest:
    approval.gives = approve_gives(approval.scope)
    return approval


def _with_how(approval: ApprovalRequest) -> ApprovalRequest:
    """How the request was decided, in words ("you, in the browser, with password and ...")."""
    approval.status_words = status_words(approval.status)
    auth = approval.decision_auth or {}
    if auth.get("approvers"):  # two-person approval: everyone whose approval counted
        names = approver_names(auth["approvers"], user_id=approval.user_id)
        approval.how = f"By {names}, each in the browser, each signed in on their own"
    elif approval.decided_by_id is not None:
        decided_by = approval.decided_by if approval.decided_by_id != approval.user_id else None
        who = decided_by.get_username() if decided_by is not None else "You"
        words = auth_words(auth.get("amr"))
        approval.how = f"{who}, in the browser" + (f", signed in with {words}" if words else "")
    elif approval.decision_method == "auto_rule":
        approval.how = f"Automatically, by the rule {auth.get('rule', '')}"
    elif approval.decision_method == "budget":
        approval.how = f"Approved within your budget ({auth.get('amount', '')} {auth.get('currency', '')})"
    elif approval.status == ApprovalRequest.Status.EXPIRED and approval.decided_at is None:
        approval.how = "Nobody answered in time"
    elif approval.status == ApprovalRequest.Status.CANCELLED:
        approval.how = "Cancelled: " + END_REASONS.get(
            approval.decision_method, approval.decision_method.replace("_", " ")
        )
    elif approval.decision_method:
        approval.how = approval.decision_method.replace("_", " ").capitalize()
    else:
        approval.how = ""
    return approval


def _needs_fresh_auth(request: HttpRequest, fresh_auth_seconds: int) -> bool:
    if not fresh_auth_seconds:
        return False
    auth_time = request.session.get(SESSION_AUTH_TIME) or 0
    return time.time() - auth_time > fresh_auth_seconds


def _owned(request: AuthenticatedHttpRequest, approval_id: UUID) -> Decision:
    """The request this person may decide or vote on, and its policy's fresh-authentication window and
    quorum (one statement), or 404."""
    found = approval_for_decision(approval_id=approval_id, user_id=request.user.pk)
    if found is None:
        approval_audit_refused_decision(
            approval_id=approval_id, user=request.user, reason="not the owner", request=request
        )
        raise Http404("No such approval request.")
    return found


def _decide(
    request: AuthenticatedHttpRequest, decision: Decision, decide: Callable[..., ApprovalRequest], verb: str
) -> HttpResponse:
    approval = decision.approval
    try:
        decided = decide(
            approval_id=approval.pk,
            user=request.user,
            auth=auth_context(request),
            request=request,
            decision=decision,
        )
    except ApprovalNotFound as exc:
        raise Http404("No such approval request.") from exc
    except ApprovalNotPending:
        approval.refresh_from_db()
        approval_audit_refused_decision(
            approval_id=approval.pk, user=request.user, request=request, reason=f"already {approval.status}"
        )
        messages.error(
            request, f"Nothing to {verb}: this request is {approval.get_status_display().lower()}."
        )
        return redirect("/approvals/")
    except VoteRefused as exc:  # two-person approval: this person may not vote (again); nothing changed
        approval_vote_refused(approval=approval, user=request.user, refusal=exc, request=request)
        messages.error(request, f"Not accepted: {exc.description}.")
        return inbox_view(request, status=exc.status_code)
    if decision.quorum is not None and decided.status == ApprovalRequest.Status.PENDING:
        state = standing(approval=decided, quorum=decision.quorum, viewer_id=request.user.pk)
        messages.success(request, f"Your approval is recorded. {waiting_words(state)}: {approval.headline}")
        return redirect("/approvals/")
    messages.success(request, f"{'Approved' if verb == 'approve' else 'Denied'}: {approval.headline}")
    return redirect("/approvals/")


@login_required
@post_only
def approve_view(request: AuthenticatedHttpRequest, approval_id: UUID) -> HttpResponse:
    decision = _owned(request, approval_id)
    if decision.approval.is_pending and _needs_fresh_auth(request, decision.fresh_auth_seconds):
        return redirect(f"/approvals/{decision.approval.pk}/confirm/")
    return _decide(request, decision, approval_approve, "approve")


@login_required
@post_only
def deny_view(request: AuthenticatedHttpRequest, approval_id: UUID) -> HttpResponse:
    return _decide(request, _owned(request, approval_id), approval_deny, "deny")


class ConfirmForm(forms.Form):
    secret = forms.CharField(widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}))


@login_required
def confirm_view(request: AuthenticatedHttpRequest, approval_id: UUID) -> HttpResponse:
    """Step-up authentication before approving (the scope policy's fresh-auth window).

    Attempts are limited per user and per source (``consent.limits.attempts``, kind ``fresh_auth``): while
    locked, the secret is not checked at all, and the page says when to try again.
    """
    decision = _owned(request, approval_id)
    approval = decision.approval
    device = TOTPDevice.objects.devices_for_user(request.user, confirmed=True).first()
    label = "Code from your authenticator app" if device else "Your password"
    form = ConfirmForm(request.POST or None)
    form.fields["secret"].label = label
    keys = attempts.keys_for(account=request.user.pk, source=client_ip(request))
    actor = f"user:{request.user.pk}"
    if request.method == "POST" and (wait := attempts.locked("fresh_auth", keys)):
        attempts.refused_while_locked("fresh_auth", keys)
        return _too_many(request, approval, form, wait)
    if request.method == "POST" and form.is_valid():
        secret = form.cleaned_data["secret"].strip()
        if device is not None:
            ok, amr = device.verify_token(secret), ["otp"]
        else:
            # The signed-in user's own password; the sign-in limit (axes) is for sign-in, this one's own.
            ok, amr = request.user.check_password(secret), ["pwd"]
        if ok:
            attempts.succeeded("fresh_auth", keys)
            previous = [m for m in (request.session.get(SESSION_AMR) or ["pwd"]) if m not in amr]
            request.session[SESSION_AMR] = previous + amr
            request.session[SESSION_AUTH_TIME] = time.time()
            return _decide(request, decision, approval_approve, "approve")
        audit_refusal(
            event="approval.reauth_failed",
            error="invalid_credentials",
            actor=actor,
            user_id=request.user.pk,
            request=request,
            detail={"approval_id": str(approval.pk)},
        )
        if wait := attempts.failed("fresh_auth", keys, request=request, actor=actor, user_id=request.user.pk):
            return _too_many(request, approval, form, wait)
        form.add_error("secret", "That is not right. Try again.")
    return render(request, "approvals/confirm.html", {"approval": approval, "form": form})


def _too_many(
    request: HttpRequest, approval: ApprovalRequest, form: ConfirmForm, seconds: int
) -> HttpResponse:
    response = render(
        request,
        "approvals/confirm.html",
        {"approval": approval, "form": form, "locked_message": attempts.message(seconds)},
        status=429,
    )
    response["Retry-After"] = str(seconds)
    return response


class BackchannelAuthenticationView(ProtocolView):
    """CIBA Core §7 backchannel authentication endpoint (poll and ping modes).

    §7.1: the agent authenticates exactly as at the token endpoint. The session token
    in ``login_hint_token`` is read together with its grant, its agent and the scope's
    policy in one statement, and the agent is authenticated against that row.
    """

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        params = form_values(request)
        try:
            agent, hint, proof = self._authenticate(request, params)
        except OAuthError as exc:
            audit_refusal(
                event="approval.request_refused",
                error="invalid_client",
                actor="",
                client_id=claimed_client_id(request),
                request=request,
                detail={"reason": exc.reason or "client authentication failed"},
            )
            return error_response(InvalidClient("Client authentication failed."))
        try:
            req = validate_backchannel_request(
                agent=agent, params=params, hint=hint, instance=proof.instance if proof is not None else ""
            )
            if proof is not None:  # one statement: records the instance on the grant, or refuses it cut off
                instance_admit(
                    agent=agent, grant=req.grant, proof=proof, where="backchannel", request=request
                )
            approval, created = approval_request_create(req=req, request=request)
        except OAuthError as exc:
            if exc.audited:
                return error_response(exc)
            audit_refusal(
                event="approval.request_refused",
                error=exc.error,
                actor=agent.actor_id,
                client_id=agent.client_id,
                request=request,
                detail={"reason": exc.description, "scope": params.get("scope", "")},
            )
            return error_response(exc)
        remaining = max(1, int((approval.expires_at - timezone.now()).total_seconds()))
        return ProtocolJsonResponse(
            {
                "auth_req_id": auth_req_id_for(approval.pk),
                "expires_in": remaining,
                "interval": approval.interval,
            },
            headers=NO_STORE,
        )

    @staticmethod
    def _authenticate(
        request: HttpRequest, params: dict[str, str]
    ) -> tuple[Agent, LoginHint | None, InstanceProof | None]:
        credentials = client_auth.presented_credentials(
            params,
            request.META.get("HTTP_AUTHORIZATION", ""),
            attestation=request.META.get("HTTP_OAUTH_CLIENT_ATTESTATION"),
            pop=request.META.get("HTTP_OAUTH_CLIENT_ATTESTATION_POP"),
        )
        if credentials.method == client_auth.NONE:  # CIBA §7.1: only clients that authenticate
            raise InvalidClient(reason="CIBA needs client authentication")
        endpoint = f"{countersign_settings.ISSUER}/o/bc-authorize/"
        scopes = params.get("scope", "").split()
        hint = read_login_hint(params.get("login_hint_token", ""), scopes[0] if len(scopes) == 1 else "")
        if hint is not None and hint.agent.client_id == credentials.client_id:
            agent, proof = client_auth.authenticate_client(credentials, hint.agent, endpoint_url=endpoint)
            return agent, hint, proof
        agent, proof = client_auth.authenticate_client_request(credentials, endpoint_url=endpoint)
        return agent, hint, proof


def _token_owner(claims: dict[str, Any]) -> int | None:
    sub = str(claims.get("sub", ""))
    return int(sub[5:]) if sub.startswith("user:") and sub[5:].isdigit() else None


class RedemptionView(ProtocolView):
    """Redeem an action token, exactly once, before the resource server acts on it.

    The token is verified locally (JWKS keys, ``typ``, audience, ``action_hash``); then one
    conditional UPDATE decides the redemption. The resource server's credentials may be
    reused from a recent verification because that UPDATE re-checks them.
    """

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        rs, refusal = resource_server_or_refusal(request, event="redemption.refused", cached=True)
        if refusal is not None:
            return refusal
        assert rs is not None  # no refusal: the resource server authenticated
        claims: dict[str, Any] = {}
        try:
            form = form_values(request)
            approval = action_token_spend(
                token=form.get("token", ""),
                resource_server=rs,
                request_hash=form.get("action_hash", ""),
                claims=claims,
            )
            action_token_redeemed_announce(approval=approval)
        except OAuthError as exc:
            # A verified token names whose it is: the refusal then shows in that person's activity.
            owner = _token_owner(claims)
            audit_refusal(
                event="redemption.refused",
                error=exc.error,
                actor=f"rs:{rs.client_id}",
                client_id=claims.get("client_id", rs.client_id) if owner else rs.client_id,
                user_id=owner,
                grant_id=claims.get("grant_id", "") if owner else "",
                request=request,
                detail={
                    "reason": exc.reason,
                    **({"approval_id": claims["approval_id"]} if owner and "approval_id" in claims else {}),
                },
            )
            return error_response(exc)
        return ProtocolJsonResponse(
            {
                "redeemed": True,
                "approval_id": str(approval.pk),
                "scope": approval.scope,
                "authorization_details": approval.authorization_details,
                "action_hash": approval.action_hash,
                "sub": claims["sub"],
                "act": claims["act"],
                "client_id": claims["client_id"],
                "receipt": receipt_from_redemption(
                    claims=claims, resource_server=rs, redeemed_at=approval.redeemed_at
                ),
            },
            headers=NO_STORE,
        )


@login_required
def receipt_view(request: AuthenticatedHttpRequest, approval_id: UUID) -> HttpResponse:
    """The signed receipt of one of the user's redeemed requests, as a file (``typ: receipt+jwt``)."""
    found = receipt_for_download(approval_id=approval_id, user_id=request.user.pk)
    if found is None:
        audit_refusal(
            event="receipt.refused",
            error="not_found",
            actor=f"user:{request.user.pk}",
            user_id=request.user.pk,
            request=request,
            detail={"approval_id": str(approval_id), "reason": "no redeemed request of this user"},
        )
        raise Http404("No redeemed request with that id.")
    approval, receipt = found
    response = HttpResponse(receipt + "\n", content_type="application/jwt")
    response["Content-Disposition"] = f'attachment; filename="receipt-{approval.pk}.jwt"'
    response["Cache-Control"] = "no-store"
    return response

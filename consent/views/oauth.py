"""Protocol endpoints: authorization (consent) and introspection.

The authorization endpoint is oauthlib's and DOT's (``consent.oauth``); the token
and revocation endpoints have paths of their own (``consent.views.token``,
``consent.views.revocation``). These views parse input, call one service, render,
and audit refusals.
"""

from typing import Any, cast
from urllib.parse import parse_qs, urlencode

import jwt
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.generic.base import TemplateResponseMixin
from oauth2_provider.exceptions import FatalClientError, OAuthToolkitError
from oauth2_provider.views.base import BaseAuthorizationView
from oauthlib.oauth2.rfc6749 import errors as oauthlib_errors

from audit.services import audit_record, audit_refusal

from ..budgets import budget_choices, budget_refusal_audit, budgets_create
from ..errors import BudgetNotFound, BudgetRefused, ConfigurationError, InvalidTarget
from ..http import (
    NO_STORE,
    AuthenticatedHttpRequest,
    ProtocolJsonResponse,
    ProtocolView,
    form_values,
    oauth_error,
)
from ..limits.jsonbounds import JSONTooDeep, check_jwt
from ..models import Agent, ResourceServer, ScopePolicy
from ..oauth.cimd import MetadataDocumentRefused, looks_like_document_url, resolve_agent
from ..oauth.resource import narrow, parse_resources
from ..selectors import (
    TOKEN_INTROSPECTORS,
    forget_resource_server,
    scope_policies,
    session_token_introspect,
)
from ..services import AuthContext, delegates_of, grant_create, grant_lifetime_choices
from ..tokens import MAX_TOKEN_BYTES
from .account import auth_context, second_factor_missing
from .rs_auth import resource_server_confirmed, resource_server_or_refusal, resource_server_refusal

# What a valid authorization request names: its scopes, oauthlib's credentials, the agent.
Validated = tuple[list[str], dict[str, Any], Agent]


class AuthorizeView(BaseAuthorizationView, TemplateResponseMixin):  # type: ignore[misc]  # DOT ships no types
    """RFC 6749 §4.1.1 authorization endpoint, with our consent screen.

    GET validates the request (client, redirect_uri, PKCE S256, scopes within the
    agent's registry) before anything is shown; a bad ``redirect_uri`` or client
    gets an error page, never a redirect (§4.1.2.1). POST re-validates the same
    request and records the user's decision.
    """

    template_name = "consent/authorize.html"

    def _validate(self, query: str) -> tuple[list[str], dict[str, Any]]:
        core = self.get_oauthlib_core()
        uri = self.request.build_absolute_uri(reverse("oauth-authorize")) + "?" + query
        scopes: list[str]
        credentials: dict[str, Any]
        scopes, credentials = core.server.validate_authorization_request(uri, "GET", None, {})
        return scopes, credentials

    def _refuse(
        self, error: OAuthToolkitError, application: Agent | None = None, query: str = ""
    ) -> HttpResponse:
        oauthlib_error = error.oauthlib_error
        audit_refusal(
            event="consent.request_refused",
            error=oauthlib_error.error,
            actor=f"user:{self.request.user.pk}",
            user_id=self.request.user.pk,
            client_id=credentials_client_id(query)[:100],
            request=self.request,
            detail={"reason": oauthlib_error.description or ""},
        )
        return self._error_page(error, application)

    def _error_page(self, error: OAuthToolkitError, application: Agent | None) -> HttpResponse:
        # DOT's error_response: a redirect to the client, or the error page (DOT ships no types).
        return cast(HttpResponse, self.error_response(error, application))

    def _screen(self, query: str, scopes: list[str], agent: Agent, **extra: str) -> HttpResponse:
        policies = scope_policies(scopes)
        context = {
            "agent": agent,
            "standard": [p for p in policies if not p.is_step_up],
            "step_up": [p for p in policies if p.is_step_up],
            "budget_values": self.request.POST if self.request.method == "POST" else {},
            "lifetimes": grant_lifetime_choices(agent),
            "delegates": delegates_of(agent),
            "authz_query": query,
            "needs_second_factor": second_factor_missing(self.request, agent, policies),
            **extra,
        }
        return render(self.request, self.template_name, context)

    def _validated(self, query: str) -> tuple[Validated | None, HttpResponse | None]:
        """(scopes, credentials, agent), or the refusal response: the same checks for GET and POST."""
        refusal = self._self_described(query)
        if refusal is not None:
            return None, refusal
        try:
            scopes, credentials = self._validate(query)
        except oauthlib_errors.FatalClientError as exc:
            return None, self._refuse(self._wrap(exc), query=query)
        except oauthlib_errors.OAuth2Error as exc:
            return None, self._refuse(self._wrap(exc), self._agent(credentials_client_id(query)), query)
        agent = Agent.objects.get(client_id=credentials["client_id"])
        try:
            credentials["resource"] = requested_resources(query, scopes)
        except InvalidTarget as exc:
            error = InvalidTargetError(description=exc.description, state=credentials.get("state"))
            error.redirect_uri = credentials.get("redirect_uri")
            return None, self._refuse(self._wrap(error), agent, query)
        return (scopes, credentials, agent), None

    def _self_described(self, query: str) -> HttpResponse | None:
        """A ``client_id`` that is a URL: fetch, check and keep its metadata document before the request
        is validated against the registry (``consent.oauth.cimd``). A refusal is an error page, never a
        redirect (the redirect URI is unverified), audited once."""
        params = parse_qs(query)
        client_id = (params.get("client_id") or [""])[0]
        if not looks_like_document_url(client_id):
            return None
        try:
            resolve_agent(
                client_id, redirect_uri=(params.get("redirect_uri") or [""])[0], request=self.request
            )
        except MetadataDocumentRefused as exc:
            audit_refusal(
                event="client_metadata.refused",
                error="invalid_client",
                actor=f"user:{self.request.user.pk}",
                user_id=self.request.user.pk,
                client_id=client_id[:100],
                request=self.request,
                detail={"reason": exc.reason},
            )
            error = oauthlib_errors.InvalidClientError(
                description="The agent's client metadata document cannot be used, so it cannot connect."
            )
            return self._error_page(FatalClientError(error=error), None)
        return None

    def get(self, request: AuthenticatedHttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        query = request.META.get("QUERY_STRING", "")
        valid, refusal = self._validated(query)
        if refusal is not None:
            return refusal
        assert valid is not None  # no refusal: the request is valid
        scopes, _, agent = valid
        return self._screen(query, scopes, agent)

    def post(self, request: AuthenticatedHttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        query = request.POST.get("authz_query", "")
        valid, refusal = self._validated(query)
        if refusal is not None:
            return refusal
        assert valid is not None  # no refusal: the request is valid
        scopes, credentials, agent = valid
        policies = scope_policies(scopes)
        user = request.user
        if request.POST.get("decision") != "allow":
            audit_record(
                event="consent.refused",
                outcome="refused",
                error="access_denied",
                actor=f"user:{user.pk}",
                user_id=user.pk,
                client_id=agent.client_id,
                request=request,
                detail={"scopes": scopes},
            )
            return self._deny(scopes, credentials, agent)
        if second_factor_missing(request, agent, policies):
            return redirect(f"{reverse('login-otp')}?{urlencode({'next': request.get_full_path()})}")
        try:
            lifetime = int(request.POST.get("lifetime", ""))
        except ValueError:
            lifetime = -1
        auth: AuthContext = auth_context(request)
        budgets = budget_choices(request.POST, [p.name for p in policies if p.is_step_up])
        try:
            with transaction.atomic():
                grant = grant_create(
                    user=user,
                    agent=agent,
                    scopes=scopes,
                    lifetime=lifetime,
                    auth=auth,
                    request=request,
                    consent_shown=_consent_shown(agent, policies, lifetime),
                )
                if budgets:  # refused: the grant is rolled back with it
                    budgets_create(grant=grant, choices=budgets, actor=f"user:{user.pk}", request=request)
                credentials["session_grant"] = grant
                uri, headers, body, status = self.create_authorization_response(
                    request=request,
                    scopes=" ".join(grant.standard_scopes),
                    credentials=credentials,
                    allow=True,
                )
        except ConfigurationError as exc:
            return self._screen(query, scopes, agent, form_error=exc.description)
        except (BudgetRefused, BudgetNotFound) as exc:
            budget_refusal_audit(exc, user_id=user.pk, request=request, client_id=agent.client_id)
            response = self._screen(
                query, scopes, agent, form_error=f"Budget not accepted: {exc.description}."
            )
            response.status_code = 400
            return response
        except OAuthToolkitError as error:
            return self._refuse(error, agent, query)
        return cast(HttpResponse, self.redirect(uri, agent))  # DOT's redirect (no types)

    def _deny(self, scopes: list[str], credentials: dict[str, Any], agent: Agent) -> HttpResponse:
        try:
            self.create_authorization_response(
                request=self.request, scopes=" ".join(scopes), credentials=credentials, allow=False
            )
        except OAuthToolkitError as error:
            return self._error_page(error, agent)
        return oauth_error("access_denied")  # unreachable: allow=False always raises

    @staticmethod
    def _wrap(exc: oauthlib_errors.OAuth2Error) -> OAuthToolkitError:
        if isinstance(exc, oauthlib_errors.FatalClientError):
            return FatalClientError(error=exc)
        return OAuthToolkitError(error=exc, redirect_uri=exc.redirect_uri)

    @staticmethod
    def _agent(client_id: str) -> Agent | None:
        agent: Agent | None = Agent.objects.filter(client_id=client_id or "").first()
        return agent


class InvalidTargetError(oauthlib_errors.OAuth2Error):
    """RFC 8707 §2: "The requested resource is invalid, missing, unknown, or malformed." """

    error = "invalid_target"


def requested_resources(query: str, scopes: list[str]) -> list[str]:
    """RFC 8707 §2.1: the ``resource`` values of an authorization request, each served by a requested
    scope (``InvalidTarget`` otherwise); stored with the code, which the token is then narrowed to."""
    resources = parse_resources(parse_qs(query).get("resource") or [])
    if resources:
        narrow(resources, scopes)
    return resources


def credentials_client_id(query: str) -> str:
    return (parse_qs(query).get("client_id") or [""])[0]


def _consent_shown(agent: Agent, policies: list[ScopePolicy], lifetime: int) -> dict[str, Any]:
    return {
        "may_delegate_to": [
            {"name": d.name, "publisher": d.publisher, "client_id": d.client_id} for d in delegates_of(agent)
        ],
        "agent": {
            "name": agent.name,
            "publisher": agent.publisher,
            "status": agent.status,
            **({"self_asserted_by": agent.self_described_host} if agent.is_self_described else {}),
        },
        "allowed_for_session": [
            {"scope": p.name, "description": p.description} for p in policies if not p.is_step_up
        ],
        "will_ask_each_time": [
            {"scope": p.name, "description": p.description} for p in policies if p.is_step_up
        ],
        "lifetime_seconds": lifetime,
    }


def _token_typ(token: str) -> str:
    """The unverified ``typ`` header, only to pick which verification applies (RFC 8725 §3.11)."""
    if len(token) > MAX_TOKEN_BYTES:
        return ""
    try:
        check_jwt(token)
        return str(jwt.get_unverified_header(token).get("typ", ""))
    except (jwt.PyJWTError, JSONTooDeep):
        return ""


class IntrospectView(ProtocolView):
    """RFC 7662 introspection endpoint, for registered resource servers only (§2.1)."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        # The credentials may be taken from a recent verification: the session-token statement
        # re-checks them (RS_CURRENT), and every other answer checks them again first.
        rs, refusal = resource_server_or_refusal(request, event="introspection.refused", cached=True)
        if refusal is not None:
            return refusal
        assert rs is not None  # no refusal: the resource server authenticated
        token = form_values(request).get("token", "")
        if not token:
            if not resource_server_confirmed(request):
                return self._no_longer(request, rs)
            audit_refusal(
                event="introspection.refused",
                error="invalid_request",
                actor=f"rs:{rs.client_id}",
                client_id=rs.client_id,
                request=request,
                detail={"reason": "token missing"},
            )
            return oauth_error("invalid_request", "The token parameter is required.")
        introspect = TOKEN_INTROSPECTORS.get(_token_typ(token), session_token_introspect)
        result = introspect(token=token, resource_server=rs)
        current = result.resource_server_current
        if current is False or (current is None and not resource_server_confirmed(request)):
            return self._no_longer(request, rs)
        if not result.active:
            audit_refusal(
                event="introspection.inactive",
                error="inactive_token",
                actor=f"rs:{rs.client_id}",
                client_id=rs.client_id,
                request=request,
                detail={"reason": result.reason},
            )
        return ProtocolJsonResponse(result.as_response(), headers=NO_STORE)

    @staticmethod
    def _no_longer(request: HttpRequest, rs: ResourceServer) -> HttpResponse:
        """Deactivated, or its secret changed, since this process verified it: 401 (RFC 7662 §2.3)."""
        forget_resource_server(rs.client_id)
        return resource_server_refusal(request, event="introspection.refused")

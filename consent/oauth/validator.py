"""oauthlib request validator: DOT's, bound to session grants.

What we change from DOT's ``OAuth2Validator``:

- Every authorization code and token row points at its session grant, which
  must be live (active and unexpired) for the code exchange and refresh
  (RFC 6749 §4.1.3, §6).
- An authorization code is consumed under a row lock; presenting it again
  revokes the grant and everything issued from it (RFC 6749 §4.1.2).
- Presenting a rotated refresh token again is reuse: the whole grant is
  revoked (RFC 9700 §4.14.2).
- Scopes must be in the agent's registry and known to scope policy.
- RFC 7009 revocation of any token of a grant revokes the grant.
"""

import hashlib
from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.settings import oauth2_settings
from oauthlib.oauth2.rfc6749 import errors

from audit.services import audit_record

from ..models import AccessToken, Agent, AuthorizationCode, RefreshToken, ScopePolicy, SessionGrant
from ..services import grant_revoke
from .context import note_refusal
from .dpop import bound_jkt, registered_thumbprints
from .private_key_jwt import CLIENT_ASSERTION_TYPE, AssertionInvalid, unverified_issuer, verify_assertion


def _param(request, name: str):
    """A body or query parameter of an oauthlib request, or None."""
    return request._params.get(name)


def _checksum(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class CountersignValidator(OAuth2Validator):
    # --- clients -------------------------------------------------------------------------------

    def client_authentication_required(self, request, *args, **kwargs):
        if _param(request, "client_assertion") is not None:
            return True
        return super().client_authentication_required(request, *args, **kwargs)

    def authenticate_client(self, request, *args, **kwargs):
        """Client secret (RFC 6749 §2.3.1) or ``private_key_jwt`` (RFC 7523 §2.2), then the
        agent's DPoP policy (RFC 9449 §5): a required proof, by one of its registered keys."""
        if _param(request, "client_assertion") is not None or _param(request, "client_assertion_type") is not None:
            authenticated = self._authenticate_private_key_jwt(request)
        else:
            authenticated = super().authenticate_client(request, *args, **kwargs)
            if authenticated:
                request.client_auth_method = "client_secret"
        if authenticated:
            self._check_dpop_key(request)
        return authenticated

    @staticmethod
    def _check_grant_binding(grant, request) -> None:
        """A session that got a DPoP-bound token stays bound (RFC 9449 §5): no bearer tokens after."""
        if grant.dpop_jkt and not bound_jkt.get():
            note_refusal("DPoP-bound session without a proof")
            raise errors.CustomOAuth2Error(error="invalid_dpop_proof", request=request,
                                           description="this session's tokens are DPoP-bound: present a DPoP proof")

    @staticmethod
    def _check_dpop_key(request) -> None:
        jkt = bound_jkt.get()
        if jkt is None:  # not a token request: DPoP proofs belong at the token endpoint only
            return
        if jkt == "" and request.client.require_dpop:
            note_refusal("DPoP required for this agent")
            raise errors.CustomOAuth2Error(error="invalid_dpop_proof", request=request,
                                           description="this agent must present a DPoP proof (RFC 9449)")
        if jkt and jkt not in registered_thumbprints(request.client):
            note_refusal("DPoP key not registered for this agent")
            raise errors.CustomOAuth2Error(error="invalid_dpop_proof", request=request,
                                           description="the DPoP key is not one registered for this agent")

    def _authenticate_private_key_jwt(self, request) -> bool:
        if _param(request, "client_assertion_type") != CLIENT_ASSERTION_TYPE:
            note_refusal(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}")
            return False
        assertion = _param(request, "client_assertion") or ""
        try:
            issuer = unverified_issuer(assertion)
            claimed = _param(request, "client_id")
            if claimed and claimed != issuer:
                raise AssertionInvalid("client_id does not match the assertion's issuer")
            agent = self._load_application(issuer, request)
            if agent is None:
                return False
            verify_assertion(assertion, agent=agent, endpoint_url=request.uri)
        except AssertionInvalid as exc:
            note_refusal(str(exc))
            return False
        request.client = agent
        request.client_id = agent.client_id
        request.client_auth_method = "private_key_jwt"
        return True

    def _load_application(self, client_id, request):
        client = super()._load_application(client_id, request)
        if client is None:
            note_refusal("unknown client or agent suspended")
        return client

    # --- scopes ----------------------------------------------------------------------------------

    def validate_scopes(self, client_id, scopes, client, request, *args, **kwargs):
        allowed = set(client.allowed_scopes or [])
        if not set(scopes) <= allowed:
            note_refusal("scope outside the agent's registered scopes")
            return False
        known = ScopePolicy.objects.filter(name__in=scopes).count()
        return known == len(set(scopes))

    def get_default_scopes(self, client_id, request, *args, **kwargs):
        return []

    # --- authorization codes -------------------------------------------------------------------

    def _code_row(self, code, request) -> AuthorizationCode | None:
        cached = getattr(request, "_cs_code", None)
        if cached is not None and cached.code == code:
            return cached
        row = (
            AuthorizationCode.objects.select_for_update()
            .select_related("session_grant")
            .filter(code=code, application=request.client)
            .first()
        )
        request._cs_code = row
        return row

    def _create_authorization_code(self, request, code, expires=None):
        """Store the code with the session grant the consent view just created."""
        return AuthorizationCode.objects.create(
            application=request.client,
            user=request.user,
            code=code["code"],
            expires=timezone.now() + timedelta(seconds=oauth2_settings.AUTHORIZATION_CODE_EXPIRE_SECONDS),
            redirect_uri=request.redirect_uri,
            scope=" ".join(request.scopes),
            code_challenge=request.code_challenge or "",
            code_challenge_method=request.code_challenge_method or "",
            session_grant=request.session_grant,
        )

    def validate_code(self, client_id, code, client, request, *args, **kwargs):
        row = self._code_row(code, request)
        if row is None:
            note_refusal("unknown authorization code")
            return False
        if row.consumed_at is not None:
            note_refusal("authorization code reused")
            grant_revoke(grant_id=row.session_grant_id, reason="authorization_code_reused",
                         actor=f"agent:{client.client_id}")
            return False
        if row.is_expired():
            note_refusal("authorization code expired")
            return False
        grant = row.session_grant
        if not grant.is_live():
            note_refusal("session grant is not active")
            return False
        self._check_grant_binding(grant, request)
        request.scopes = row.scope.split()
        request.user = None  # tokens take the user from the session grant: no user query needed
        request.session_grant = grant
        return True

    def confirm_redirect_uri(self, client_id, code, redirect_uri, client, request, *args, **kwargs):
        """RFC 6749 §4.1.3: the same redirect_uri as in the authorization request."""
        row = self._code_row(code, request)
        return row is not None and row.redirect_uri_allowed(redirect_uri)

    def get_code_challenge(self, code, request):
        row = self._code_row(code, request)
        return (row.code_challenge or None) if row else None

    def get_code_challenge_method(self, code, request):
        row = self._code_row(code, request)
        return (row.code_challenge_method or None) if row else None

    def get_authorization_code_scopes(self, client_id, code, redirect_uri, request):
        row = self._code_row(code, request)
        return row.scope.split() if row else []

    def invalidate_authorization_code(self, client_id, code, request, *args, **kwargs):
        AuthorizationCode.objects.filter(pk=self._code_row(code, request).pk).update(
            consumed_at=timezone.now()
        )

    # --- refresh tokens --------------------------------------------------------------------------

    def validate_refresh_token(self, refresh_token, client, request, *args, **kwargs):
        # Locked: of two concurrent refreshes with one token, the second waits, then sees it
        # revoked (rotated) and is treated as reuse. The token view runs in one transaction.
        rt = (
            RefreshToken.objects.select_for_update(of=("self",))
            .select_related("session_grant", "access_token")
            .filter(token_checksum=_checksum(refresh_token))
            .order_by("-id")
            .first()
        )
        if rt is None or rt.application_id != client.pk:
            note_refusal("unknown refresh token")
            return False
        if rt.revoked is not None:
            note_refusal("refresh token reused after rotation", audited=True)
            if grant_revoke(grant_id=rt.session_grant_id, reason="refresh_token_reused",
                            actor=f"agent:{client.client_id}"):
                audit_record(event="refresh_token.reuse_detected", outcome="refused",
                             actor=f"agent:{client.client_id}", user_id=rt.user_id,
                             client_id=client.client_id, grant_id=rt.session_grant_id,
                             error="invalid_grant")
            return False
        if client.refresh_mode != Agent.RefreshMode.ROTATING:
            note_refusal("agent's refresh mode does not allow refresh tokens")
            return False
        if not rt.session_grant.is_live():
            note_refusal("session grant is not active")
            return False
        self._check_grant_binding(rt.session_grant, request)
        request.user = None
        request.refresh_token = refresh_token
        request.refresh_token_instance = rt
        request.session_grant = rt.session_grant
        return True

    def _check_and_set_request_resource(self, request):
        """RFC 8707 resource indicators are not supported: scopes decide a token's audience."""
        if request._params.get("resource"):
            raise errors.CustomOAuth2Error(error="invalid_target", request=request,
                                           description="resource indicators are not supported; scopes decide aud")
        request.resource = []

    def get_original_scopes(self, refresh_token, request, *args, **kwargs):
        return list(request.session_grant.standard_scopes)

    # --- saving tokens ---------------------------------------------------------------------------

    def _create_access_token(self, expires, request, token, source_refresh_token=None):
        access_token = AccessToken(
            user_id=request.session_grant.user_id,
            scope=token["scope"],
            expires=expires,
            application=request.client,
            source_refresh_token=source_refresh_token,
            session_grant=request.session_grant,
            jti=request.token_jti,
        )
        self._set_token_value(access_token, token["access_token"])
        access_token.save()
        return access_token

    def _create_refresh_token(self, request, refresh_token_code, access_token, previous_refresh_token):
        refresh_token = RefreshToken(
            user_id=request.session_grant.user_id,
            application=request.client,
            access_token=access_token,
            token_family=previous_refresh_token.token_family if previous_refresh_token else None,
            session_grant=request.session_grant,
        )
        self._set_token_value(refresh_token, refresh_token_code)
        refresh_token.save()
        return refresh_token

    def save_bearer_token(self, token, request, *args, **kwargs):
        # The token view already runs in one transaction: DOT's own atomic would only add a savepoint.
        with transaction.atomic(savepoint=False):
            self._save_bearer_token(token, request, *args, **kwargs)
        grant: SessionGrant = request.session_grant
        audit_record(
            event="token.refreshed" if request.grant_type == "refresh_token" else "token.issued",
            actor=f"agent:{request.client.client_id}", user_id=grant.user_id,
            client_id=request.client.client_id, grant_id=grant.pk,
            detail={"jti": request.token_jti, "scope": token.get("scope", ""),
                    "expires_in": token.get("expires_in"), "refresh_token": "refresh_token" in token},
        )

    # --- RFC 7009 --------------------------------------------------------------------------------

    def revoke_token(self, token, token_type_hint, request, *args, **kwargs):
        """RFC 7009 §2.1: revoking any token of a session grant revokes the grant.

        Unknown tokens, and tokens of other clients, are ignored (the endpoint
        still answers 200, §2.2).
        """
        checksum = _checksum(token)
        kinds = [AccessToken, RefreshToken]
        if token_type_hint == "refresh_token":
            kinds.reverse()
        for model in kinds:
            row = model.objects.filter(token_checksum=checksum, application=request.client).first()
            if row is not None:
                grant_revoke(grant_id=row.session_grant_id, reason="revoked_by_agent",
                             actor=f"agent:{request.client.client_id}")
                return

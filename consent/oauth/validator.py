"""oauthlib request validator for the authorization endpoint: DOT's, bound to session grants.

What we change from DOT's ``OAuth2Validator``:

- Scopes must be in the agent's registry and known to scope policy
  (RFC 6749 §3.3); an agent pending review (self-described, not yet activated)
  gets no step-up scope.
- Every authorization code row points at the session grant the consent view
  created for it, so the code exchange (``consent.grants.authorization_code``)
  can check that the grant is still live.
"""

from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.settings import oauth2_settings
from oauthlib.common import Request

from ..models import Agent, AuthorizationCode, ScopePolicy


class CountersignValidator(OAuth2Validator):  # type: ignore[misc]  # DOT ships no types
    def validate_scopes(
        self, client_id: str, scopes: list[str], client: Agent, request: Request, *args: Any, **kwargs: Any
    ) -> bool:
        if not set(scopes) <= set(client.allowed_scopes or []):
            return False
        known: dict[str, str] = dict(
            ScopePolicy.objects.filter(name__in=scopes).values_list("name", "sensitivity")
        )
        if not client.is_active and ScopePolicy.Sensitivity.STEP_UP in known.values():
            return False  # pending review (a self-described agent): no step-up until an admin activates it
        return len(known) == len(set(scopes))

    def get_default_scopes(self, client_id: str, request: Request, *args: Any, **kwargs: Any) -> list[str]:
        return []

    def _create_authorization_code(
        self, request: Request, code: dict[str, str], expires: datetime | None = None
    ) -> AuthorizationCode:
        """Store the code with the session grant the consent view just created."""
        code_row: AuthorizationCode = AuthorizationCode.objects.create(
            application=request.client,
            user=request.user,
            code=code["code"],
            expires=timezone.now() + timedelta(seconds=oauth2_settings.AUTHORIZATION_CODE_EXPIRE_SECONDS),
            redirect_uri=request.redirect_uri,
            scope=" ".join(request.scopes or []),  # validated: never None here
            code_challenge=request.code_challenge or "",
            code_challenge_method=request.code_challenge_method or "",
            session_grant=request.session_grant,
            resource=list(getattr(request, "resource", None) or []),  # RFC 8707 §2.1, checked by the view
        )
        return code_row

"""DOT scopes backend backed by admin-managed scope policies."""

from typing import Any

from oauth2_provider.scopes import BaseScopes

from ..models import Agent, ScopePolicy


class PolicyScopes(BaseScopes):  # type: ignore[misc]  # DOT ships no types
    def get_all_scopes(self) -> dict[str, str]:
        return dict(ScopePolicy.objects.values_list("name", "description"))

    def get_available_scopes(
        self, application: Agent | None = None, request: object = None, *args: Any, **kwargs: Any
    ) -> list[str]:
        return list(application.allowed_scopes or []) if application is not None else []

    def get_default_scopes(
        self, application: Agent | None = None, request: object = None, *args: Any, **kwargs: Any
    ) -> list[str]:
        return []

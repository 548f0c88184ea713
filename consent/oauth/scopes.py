"""DOT scopes backend backed by admin-managed scope policies."""

from oauth2_provider.scopes import BaseScopes

from ..models import ScopePolicy


class PolicyScopes(BaseScopes):
    def get_all_scopes(self):
        return dict(ScopePolicy.objects.values_list("name", "description"))

    def get_available_scopes(self, application=None, request=None, *args, **kwargs):
        return list(application.allowed_scopes or []) if application is not None else []

    def get_default_scopes(self, application=None, request=None, *args, **kwargs):
        return []

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from approvals import pages
from config import health
from consent.views import account, budgets, discovery, oauth, registration, registry, revocation, token, usage

urlpatterns = [
    path("", RedirectView.as_view(url="/grants/", permanent=False)),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path(".well-known/oauth-authorization-server", discovery.metadata_view, name="oauth-metadata"),
    path(".well-known/openid-configuration", discovery.metadata_view, name="openid-configuration"),
    path(".well-known/jwks.json", discovery.jwks_view, name="jwks"),
    path("o/authorize/", oauth.AuthorizeView.as_view(), name="oauth-authorize"),
    path("o/token/", token.token_view, name="oauth-token"),
    path("o/revoke/", revocation.revocation_view, name="oauth-revoke"),
    path("o/introspect/", oauth.IntrospectView.as_view(), name="oauth-introspect"),
    path("o/register/", registration.registration_view, name="oauth-register"),
    path("o/usage/", usage.usage_view, name="usage"),
    # path: a self-described agent's client_id may be a URL (Client ID Metadata Documents).
    path("o/agents/<path:client_id>", registry.agent_view, name="agent-registry-entry"),
    path(".well-known/agent-registry.jwt", registry.registry_document_view, name="agent-registry-document"),
    path("accounts/login/", account.login_view, name="login"),
    path("accounts/login/otp/", account.login_otp_view, name="login-otp"),
    path("accounts/logout/", account.logout_view, name="logout"),
    path("accounts/totp/", account.totp_setup_view, name="totp-setup"),
    path("grants/", pages.grants_view, name="grants"),
    path("grants/<uuid:grant_id>/", pages.grant_detail_view, name="grant-detail"),
    path("grants/<uuid:grant_id>/revoke/", account.grant_revoke_view, name="grant-revoke"),
    path("grants/<uuid:grant_id>/budgets/", budgets.budget_add_view, name="budget-add"),
    path(
        "grants/<uuid:grant_id>/budgets/<int:budget_id>/lower/",
        budgets.budget_lower_view,
        name="budget-lower",
    ),
    path("grants/<uuid:grant_id>/budgets/<int:budget_id>/end/", budgets.budget_end_view, name="budget-end"),
    path(
        "grants/<uuid:grant_id>/instances/<int:instance_pk>/cut-off/",
        account.instance_cut_off_view,
        name="instance-cut-off",
    ),
    path("activity/", pages.activity_view, name="activity"),
    path("", include("approvals.urls")),
    path("", include("ledger.urls")),
    path("admin/", admin.site.urls),
]

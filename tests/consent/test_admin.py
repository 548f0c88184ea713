"""The admin writes through the same services as the management commands (Django's test client on /admin/)."""

import re
from datetime import UTC, datetime

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client

from audit.models import AuditEvent
from consent.models import Agent, ResourceServer, ScopePolicy, SessionGrant
from consent.services import AuthContext, grant_create
from consent.tokens import audiences_for
from tests.consent.test_commands import _client_authenticates

pytestmark = pytest.mark.django_db

SECRET_SHOWN = re.compile(r"client id <code>([^<]+)</code>, secret <code>([^<]+)</code>")


@pytest.fixture
def admin_client(scenario) -> Client:
    admin = get_user_model().objects.create_superuser("root", password="not the officer's")
    client = Client()
    client.force_login(admin)
    client.admin_user = admin  # type: ignore[attr-defined]
    return client


def _actor(client: Client) -> str:
    return f"admin:{client.admin_user.pk}"  # type: ignore[attr-defined]


def _agent_form(agent: Agent | None = None, **changes: object) -> dict[str, object]:
    """Every field the agent form posts, as it stands (or a new agent's), with ``changes``."""
    form: dict[str, object] = {
        "name": "Invoice Agent",
        "publisher": "Acme Agents",
        "description": "Matches invoices to purchase orders.",
        "status": Agent.Status.ACTIVE,
        "allowed_scopes": ["catalog:read", "ledger:write"],
        "access_token_ttl": "900",
        "refresh_mode": Agent.RefreshMode.ROTATING,
        "max_grant_lifetime": str(7 * 24 * 3600),
        "redirect_uris": "https://invoices.example/callback",
        "jwks": "",
        "backchannel_client_notification_endpoint": "",
    }
    if agent is not None:
        form |= {
            "name": agent.name,
            "publisher": agent.publisher,
            "description": agent.description,
            "status": agent.status,
            "allowed_scopes": list(agent.allowed_scopes),
            "access_token_ttl": str(agent.access_token_ttl),
            "refresh_mode": agent.refresh_mode,
            "max_grant_lifetime": str(agent.max_grant_lifetime),
            "redirect_uris": agent.redirect_uris,
        }
    return form | changes


def _shown_secret(response) -> tuple[str, str]:
    for message in get_messages(response.wsgi_request):
        found = SECRET_SHOWN.search(str(message))
        if found:
            return found.group(1), found.group(2)
    raise AssertionError("no secret was shown")


def _active_grant(scenario) -> SessionGrant:
    return grant_create(
        user=scenario.user,
        agent=scenario.agent,
        scopes=["catalog:read"],
        lifetime=3600,
        auth=AuthContext(auth_time=datetime.now(tz=UTC), amr=["pwd"]),
        consent_shown={},
    )


def test_an_agent_added_in_the_admin_is_registered_as_agent_create_registers_it(admin_client, settings):
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "DEFAULT_ACCESS_TOKEN_TTL": 600}

    response = admin_client.post(
        "/admin/consent/agent/add/",
        _agent_form(require_second_factor="on", access_token_ttl="300"),
        follow=True,
    )

    assert response.status_code == 200
    agent = Agent.objects.get(name="Invoice Agent")
    client_id, secret = _shown_secret(response)
    assert client_id == agent.client_id
    assert agent.client_secret != secret  # stored hashed
    assert _client_authenticates(client_id, secret)
    assert (agent.access_token_ttl, agent.require_second_factor) == (300, True)
    assert agent.allowed_scopes == ["catalog:read", "ledger:write"]
    created = AuditEvent.objects.get(event="agent.created", client_id=client_id)
    assert created.actor == _actor(admin_client)
    assert created.detail["scopes"] == ["catalog:read", "ledger:write"]
    changed = AuditEvent.objects.get(event="agent.changed", client_id=client_id)
    assert changed.detail == {"require_second_factor": True}


def test_an_agent_without_a_redirect_uri_is_refused_on_the_form(admin_client):
    response = admin_client.post("/admin/consent/agent/add/", _agent_form(redirect_uris=""))

    assert response.status_code == 200
    assert "An agent needs at least one redirect URI." in response.content.decode()
    assert not Agent.objects.filter(name="Invoice Agent").exists()
    assert not AuditEvent.objects.filter(event="agent.created", actor=_actor(admin_client)).exists()


def test_suspending_an_agent_in_its_form_revokes_its_grants_as_agent_update_does(admin_client, scenario):
    grant = _active_grant(scenario)
    agent = scenario.agent

    response = admin_client.post(
        f"/admin/consent/agent/{agent.pk}/change/", _agent_form(agent, status=Agent.Status.SUSPENDED)
    )

    assert response.status_code == 302, response.content[:2000]
    agent.refresh_from_db()
    grant.refresh_from_db()
    assert agent.status == Agent.Status.SUSPENDED
    assert (grant.status, grant.end_reason) == (SessionGrant.Status.REVOKED, "agent_suspended")
    changed = AuditEvent.objects.get(event="agent.changed", client_id=agent.client_id)
    assert (changed.actor, changed.detail) == (_actor(admin_client), {"status": Agent.Status.SUSPENDED})
    revoked = AuditEvent.objects.get(event="grant.revoked", grant_id=str(grant.pk))
    assert revoked.actor == _actor(admin_client)


def test_the_suspend_action_revokes_grants_too(admin_client, scenario):
    grant = _active_grant(scenario)

    response = admin_client.post(
        "/admin/consent/agent/", {"action": "suspend", "_selected_action": [scenario.agent.pk]}
    )

    assert response.status_code == 302
    grant.refresh_from_db()
    assert (grant.status, grant.end_reason) == (SessionGrant.Status.REVOKED, "agent_suspended")


def test_saving_an_agent_unchanged_writes_nothing(admin_client, scenario):
    before = AuditEvent.objects.count()

    response = admin_client.post(
        f"/admin/consent/agent/{scenario.agent.pk}/change/", _agent_form(scenario.agent)
    )

    assert response.status_code == 302
    assert AuditEvent.objects.count() == before


def _policy_form(policy: ScopePolicy, **changes: object) -> dict[str, object]:
    form: dict[str, object] = {
        "description": policy.description,
        "audience": policy.audience,
        "sensitivity": policy.sensitivity,
        "approval_window": str(policy.approval_window),
        "action_token_ttl": str(policy.action_token_ttl),
        "fresh_auth_seconds": "",
        "authorization_details_types": "[]",
        "auto_approve_rule": "",
    }
    return form | changes


def test_a_scope_policy_edit_in_the_admin_takes_effect_on_the_next_token_at_once(admin_client):
    policy = ScopePolicy.objects.get(name="catalog:read")
    assert audiences_for(["catalog:read"]) == ["http://catalog.test"]  # cached from here on

    response = admin_client.post(
        f"/admin/consent/scopepolicy/{policy.pk}/change/",
        _policy_form(policy, audience="http://catalog-2.test"),
    )

    assert response.status_code == 302, response.content[:2000]
    assert audiences_for(["catalog:read"]) == ["http://catalog-2.test"]
    changed = AuditEvent.objects.get(event="scope_policy.changed", actor=_actor(admin_client))
    assert changed.detail == {"name": "catalog:read", "audience": "http://catalog-2.test"}


def test_a_scope_keeps_its_name_in_the_admin(admin_client):
    policy = ScopePolicy.objects.get(name="catalog:read")

    admin_client.post(
        f"/admin/consent/scopepolicy/{policy.pk}/change/", _policy_form(policy, name="catalog:everything")
    )

    assert ScopePolicy.objects.filter(name="catalog:read").exists()
    assert not ScopePolicy.objects.filter(name="catalog:everything").exists()


def test_a_scope_policy_added_in_the_admin_is_created_through_scope_set(admin_client):
    audiences_for(["catalog:read"])  # a cached map, without the new scope's audience
    form = {
        "name": "invoices:pay",
        "description": "Pay an invoice",
        "audience": "http://invoices.test",
        "sensitivity": ScopePolicy.Sensitivity.STEP_UP,
        "approval_window": "300",
        "action_token_ttl": "120",
        "fresh_auth_seconds": "",
        "authorization_details_types": "[]",
        "auto_approve_rule": "",
    }

    response = admin_client.post("/admin/consent/scopepolicy/add/", form)

    assert response.status_code == 302, response.content[:2000]
    policy = ScopePolicy.objects.get(name="invoices:pay")
    assert policy.approval_window == 300
    assert audiences_for(["invoices:pay"]) == ["http://invoices.test"]
    assert AuditEvent.objects.filter(event="scope_policy.created", actor=_actor(admin_client)).exists()


def test_a_resource_server_added_in_the_admin_is_created_as_the_command_creates_it(admin_client):
    response = admin_client.post(
        "/admin/consent/resourceserver/add/",
        {"name": "Invoices", "audience": "http://invoices.test", "is_active": "on"},
        follow=True,
    )

    assert response.status_code == 200
    rs = ResourceServer.objects.get(audience="http://invoices.test")
    client_id, secret = _shown_secret(response)
    assert client_id == rs.client_id and client_id.startswith("rs_")
    assert rs.client_secret != secret
    created = AuditEvent.objects.get(event="resource_server.created", client_id=client_id)
    assert created.actor == _actor(admin_client)

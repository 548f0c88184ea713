"""The admin writes through the same services as the management commands (Django's test client on /admin/)."""

import re
from datetime import UTC, datetime

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client
from pytest_django import Settings

from audit.models import AuditEvent
from consent.models import Agent, ResourceServer, ScopePolicy, SessionGrant
from consent.services import AuthContext, grant_create
from consent.tokens import audiences_for
from tests.conftest import ClientResponse, Scenario
from tests.consent.test_commands import _client_authenticates
from tests.consent.test_revocation_paths import _FormValues

pytestmark = pytest.mark.django_db

SECRET_SHOWN = re.compile(r"client id <code>([^<]+)</code>, secret <code>([^<]+)</code>")


class AdminClient(Client):
    """A test client signed in as a superuser, who is at hand as ``admin_user``."""

    admin_user: User


@pytest.fixture
def admin_client(scenario: Scenario) -> AdminClient:
    admin = get_user_model().objects.create_superuser("root", password="not the officer's")
    client = AdminClient()
    client.force_login(admin)
    client.admin_user = admin
    return client


def _actor(client: AdminClient) -> str:
    return f"admin:{client.admin_user.pk}"


def _form(client: Client, url: str, form_id: str, **changes: object) -> dict[str, object]:
    """What a browser would submit from the admin page at ``url`` (its values as shown), with ``changes``."""
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    parser = _FormValues(form_id)
    parser.feed(page.content.decode())
    data: dict[str, list[str | None]] = {}
    for name, value in parser.values:
        data.setdefault(name, []).append(value)
    return {**data, **changes, "_save": "Save"}


def _new_agent(client: Client, **changes: object) -> dict[str, object]:
    return _form(
        client,
        "/admin/consent/agent/add/",
        "agent_form",
        **{
            "name": "Invoice Agent",
            "publisher": "Acme Agents",
            "description": "Matches invoices to purchase orders.",
            "allowed_scopes": ["catalog:read", "ledger:write"],
            "redirect_uris": "https://invoices.example/callback",
            **changes,
        },
    )


def _shown_secret(response: ClientResponse) -> tuple[str, str]:
    for message in get_messages(response.wsgi_request):
        found = SECRET_SHOWN.search(str(message))
        if found:
            return found.group(1), found.group(2)
    raise AssertionError("no secret was shown")
    raise AssertionError("no secret was shown")


def _active_grant(scenario: Scenario) -> SessionGrant:
    return grant_create(
        user=scenario.user,
        agent=scenario.agent,
        scopes=["catalog:read"],
        lifetime=3600,
        auth=AuthContext(auth_time=datetime.now(tz=UTC), amr=["pwd"]),
        consent_shown={},
    )


def test_an_agent_added_in_the_admin_is_registered_as_agent_create_registers_it(
    admin_client: AdminClient, settings: Settings
) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "DEFAULT_ACCESS_TOKEN_TTL": 600}

    response = admin_client.post(
        "/admin/consent/agent/add/", _new_agent(admin_client, require_second_factor="on"), follow=True
    )

    assert response.status_code == 200
    agent = Agent.objects.get(name="Invoice Agent")
    client_id, secret = _shown_secret(response)
    assert client_id == agent.client_id
    assert agent.client_secret != secret  # stored hashed
    assert _client_authenticates(client_id, secret)
    assert (agent.access_token_ttl, agent.require_second_factor) == (600, True)  # the configured default
    assert agent.allowed_scopes == ["catalog:read", "ledger:write"]
    created = AuditEvent.objects.get(event="agent.created", client_id=client_id)
    assert created.actor == _actor(admin_client)
    assert created.detail["scopes"] == ["catalog:read", "ledger:write"]
    changed = AuditEvent.objects.get(event="agent.changed", client_id=client_id)
    assert changed.detail == {"require_second_factor": True}


def test_an_agent_without_a_redirect_uri_is_refused_on_the_form(admin_client: AdminClient) -> None:
    response = admin_client.post("/admin/consent/agent/add/", _new_agent(admin_client, redirect_uris=""))

    assert response.status_code == 200
    assert "An agent needs at least one redirect URI." in response.content.decode()
    assert not Agent.objects.filter(name="Invoice Agent").exists()
    assert not AuditEvent.objects.filter(event="agent.created", actor=_actor(admin_client)).exists()


def test_suspending_an_agent_in_its_form_revokes_its_grants_as_agent_update_does(
    admin_client: AdminClient, scenario: Scenario
) -> None:
    grant = _active_grant(scenario)
    agent = scenario.agent

    url = f"/admin/consent/agent/{agent.pk}/change/"
    response = admin_client.post(url, _form(admin_client, url, "agent_form", status=Agent.Status.SUSPENDED))

    assert response.status_code == 302, response.content[:2000]
    agent.refresh_from_db()
    grant.refresh_from_db()
    assert agent.status == Agent.Status.SUSPENDED
    assert (grant.status, grant.end_reason) == (SessionGrant.Status.REVOKED, "agent_suspended")
    changed = AuditEvent.objects.get(event="agent.changed", client_id=agent.client_id)
    assert (changed.actor, changed.detail) == (_actor(admin_client), {"status": Agent.Status.SUSPENDED})
    revoked = AuditEvent.objects.get(event="grant.revoked", grant_id=str(grant.pk))
    assert revoked.actor == _actor(admin_client)


def test_the_suspend_action_revokes_grants_too(admin_client: AdminClient, scenario: Scenario) -> None:
    grant = _active_grant(scenario)

    response = admin_client.post(
        "/admin/consent/agent/", {"action": "suspend", "_selected_action": [scenario.agent.pk]}
    )

    assert response.status_code == 302
    grant.refresh_from_db()
    assert (grant.status, grant.end_reason) == (SessionGrant.Status.REVOKED, "agent_suspended")


def test_saving_an_agent_unchanged_writes_nothing(admin_client: AdminClient, scenario: Scenario) -> None:
    before = AuditEvent.objects.count()

    url = f"/admin/consent/agent/{scenario.agent.pk}/change/"
    response = admin_client.post(url, _form(admin_client, url, "agent_form"))

    assert response.status_code == 302
    assert AuditEvent.objects.count() == before


def _policy_form(client: Client, policy: ScopePolicy | None = None, **changes: object) -> dict[str, object]:
    url = f"/admin/consent/scopepolicy/{policy.pk}/change/" if policy else "/admin/consent/scopepolicy/add/"
    return _form(client, url, "scopepolicy_form", **changes)


def test_a_scope_policy_edit_in_the_admin_takes_effect_on_the_next_token_at_once(
    admin_client: AdminClient,
) -> None:
    policy = ScopePolicy.objects.get(name="catalog:read")
    assert audiences_for(["catalog:read"]) == ["http://catalog.test"]  # cached from here on

    response = admin_client.post(
        f"/admin/consent/scopepolicy/{policy.pk}/change/",
        _policy_form(admin_client, policy, audience="http://catalog-2.test"),
    )

    assert response.status_code == 302, response.content[:2000]
    assert audiences_for(["catalog:read"]) == ["http://catalog-2.test"]
    changed = AuditEvent.objects.get(event="scope_policy.changed", actor=_actor(admin_client))
    assert changed.detail == {"name": "catalog:read", "audience": "http://catalog-2.test"}


def test_a_scope_keeps_its_name_in_the_admin(admin_client: AdminClient) -> None:
    policy = ScopePolicy.objects.get(name="catalog:read")

    admin_client.post(
        f"/admin/consent/scopepolicy/{policy.pk}/change/",
        _policy_form(admin_client, policy, name="catalog:everything", description="Everything"),
    )

    assert ScopePolicy.objects.filter(name="catalog:read").exists()
    assert not ScopePolicy.objects.filter(name="catalog:everything").exists()


def test_a_scope_policy_added_in_the_admin_is_created_through_scope_set(
    admin_client: AdminClient, settings: Settings
) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "DEFAULT_APPROVAL_WINDOW": 300}
    form = _policy_form(
        admin_client,
        name="invoices:pay",
        description="Pay an invoice",
        audience="http://invoices.test",
        sensitivity=ScopePolicy.Sensitivity.STEP_UP,
    )

    response = admin_client.post("/admin/consent/scopepolicy/add/", form)

    assert response.status_code == 302, response.content[:2000]
    policy = ScopePolicy.objects.get(name="invoices:pay")
    assert (policy.approval_window, policy.action_token_ttl) == (300, 120)  # the form showed the defaults
    assert audiences_for(["invoices:pay"]) == ["http://invoices.test"]
    created = AuditEvent.objects.get(event="scope_policy.created", actor=_actor(admin_client))
    assert created.detail["name"] == "invoices:pay"


def test_a_resource_server_added_in_the_admin_is_created_as_the_command_creates_it(
    admin_client: AdminClient,
) -> None:
    form = _form(
        admin_client,
        "/admin/consent/resourceserver/add/",
        "resourceserver_form",
        name="Invoices",
        audience="http://invoices.test",
    )

    response = admin_client.post("/admin/consent/resourceserver/add/", form, follow=True)

    assert response.status_code == 200
    rs = ResourceServer.objects.get(audience="http://invoices.test")
    client_id, secret = _shown_secret(response)
    assert client_id == rs.client_id and client_id.startswith("rs_")
    assert rs.client_secret != secret
    created = AuditEvent.objects.get(event="resource_server.created", client_id=client_id)
    assert created.actor == _actor(admin_client)

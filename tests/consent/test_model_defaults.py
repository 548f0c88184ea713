"""A new row's defaults come from ``COUNTERSIGN`` (consent.conf), the one place they are set."""

import pytest
from pytest_django import Settings

from approvals.models import ApprovalRequest
from consent.conf import DEFAULTS
from consent.models import Agent, ScopePolicy
from consent.services import agent_create, scope_set

pytestmark = pytest.mark.django_db

STEP_UP = {"audience": "https://ledger.example", "sensitivity": ScopePolicy.Sensitivity.STEP_UP}


def test_a_new_step_up_scope_gets_the_configured_window_and_token_lifetime(settings: Settings) -> None:
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "DEFAULT_APPROVAL_WINDOW": 300,
        "DEFAULT_ACTION_TOKEN_TTL": 45,
    }

    policy, created = scope_set(name="ledger:post", values=STEP_UP, actor="test")

    assert created
    stored = ScopePolicy.objects.get(pk=policy.pk)
    assert (stored.approval_window, stored.action_token_ttl) == (300, 45)


def test_without_settings_the_defaults_are_those_of_consent_conf(settings: Settings) -> None:
    settings.COUNTERSIGN = {
        k: v
        for k, v in settings.COUNTERSIGN.items()
        if k not in ("DEFAULT_APPROVAL_WINDOW", "DEFAULT_ACTION_TOKEN_TTL", "CIBA_INTERVAL")
    }

    policy, _ = scope_set(name="ledger:post", values=STEP_UP, actor="test")

    assert policy.approval_window == DEFAULTS["DEFAULT_APPROVAL_WINDOW"]
    assert policy.action_token_ttl == DEFAULTS["DEFAULT_ACTION_TOKEN_TTL"]
    assert ApprovalRequest._meta.get_field("interval").get_default() == DEFAULTS["CIBA_INTERVAL"]


def test_a_scope_set_with_its_own_values_keeps_them(settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "DEFAULT_APPROVAL_WINDOW": 300}

    policy, _ = scope_set(name="ledger:post", values={**STEP_UP, "approval_window": 90}, actor="test")

    assert ScopePolicy.objects.get(pk=policy.pk).approval_window == 90


def test_a_new_approval_request_polls_at_the_configured_interval(settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "CIBA_INTERVAL": 7}

    assert ApprovalRequest._meta.get_field("interval").get_default() == 7


def test_a_new_agent_gets_the_configured_access_token_lifetime(settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "DEFAULT_ACCESS_TOKEN_TTL": 600}

    agent, _ = agent_create(
        name="Procurement assistant",
        publisher="Example",
        scopes=[],
        redirect_uris=["https://assistant.example/cb"],
        actor="test",
    )

    assert Agent.objects.get(pk=agent.pk).access_token_ttl == 600

"""Admin management commands, driven as scripts drive them (``call_command`` with CLI arguments)."""

import json
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client

from audit.models import AuditEvent
from consent.models import Agent, ResourceServer, ScopePolicy, SessionGrant
from tests.conftest import REDIRECT_URI, OAuthFlow, Scenario, basic, pkce_pair

pytestmark = pytest.mark.django_db


def _run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _run_json(*args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(_run(*args, "--json"))
    return out


def _refused(*args: str) -> None:
    with pytest.raises(CommandError):
        call_command(*args, stdout=StringIO(), stderr=StringIO())


def _client_authenticates(client_id: str, secret: str) -> bool:
    """Ask the token endpoint with a grant that cannot work: 401 means the client did not authenticate,
    400 invalid_grant means it did."""
    response = Client().post(
        "/o/token/",
        urlencode({"grant_type": "refresh_token", "refresh_token": "nope"}),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(client_id, secret),
    )
    if response.status_code == 401:
        assert response.json()["error"] == "invalid_client"
        return False
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant", response.content
    return True


def _rs_authenticates(client_id: str, secret: str) -> bool:
    response = Client().post(
        "/o/introspect/",
        urlencode({"token": "nope"}),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(client_id, secret),
    )
    assert response.status_code in (200, 401)
    return response.status_code == 200


def _session_token(
    *,
    username: str,
    password: str,
    client_id: str,
    secret: str,
    scope: str,
    redirect_uri: str = REDIRECT_URI,
    lifetime: int = 3600,
) -> dict[str, Any]:
    """The whole code flow for any user and agent; returns the token response JSON."""
    browser = Client()
    assert browser.login(username=username, password=password)
    verifier, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    response = browser.post(
        "/o/authorize/", {"authz_query": query, "decision": "allow", "lifetime": str(lifetime)}
    )
    assert response.status_code == 302, response.content[:300]
    code = parse_qs(urlparse(response["Location"]).query)["code"][0]
    response = browser.post(
        "/o/token/",
        urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
        ),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(client_id, secret),
    )
    assert response.status_code == 200, response.content
    body: dict[str, Any] = response.json()
    return body


def _introspect(token: str, client_id: str, secret: str) -> dict[str, Any]:
    response = Client().post(
        "/o/introspect/",
        urlencode({"token": token}),
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic(client_id, secret),
    )
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def _claims(token: str) -> dict[str, Any]:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


# --- scope_set ------------------------------------------------------------------------------------


def test_scope_set_creates_and_changes_a_policy(db: None) -> None:
    out = _run(
        "scope_set",
        "reports:read",
        "--audience",
        "http://reports.test",
        "--sensitivity",
        "standard",
        "--description",
        "Read monthly reports",
    )
    assert "Created" in out
    policy = ScopePolicy.objects.get(name="reports:read")
    assert (policy.audience, policy.sensitivity, policy.description) == (
        "http://reports.test",
        "standard",
        "Read monthly reports",
    )

    out = _run(
        "scope_set",
        "reports:read",
        "--audience",
        "http://reports.test",
        "--sensitivity",
        "step_up",
        "--approval-window",
        "900",
        "--action-ttl",
        "60",
        "--fresh-auth",
        "300",
        "--authorization-details-types",
        "report_export other_type",
    )
    assert "Updated" in out
    policy.refresh_from_db()
    assert policy.sensitivity == "step_up" and policy.approval_window == 900
    assert policy.action_token_ttl == 60 and policy.fresh_auth_seconds == 300
    assert policy.authorization_details_types == ["report_export", "other_type"]
    assert policy.description == "Read monthly reports"  # untouched when not given
    assert ScopePolicy.objects.filter(name="reports:read").count() == 1
    assert AuditEvent.objects.filter(event="scope_policy.changed").count() == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--sensitivity", "secret"],
        ["--sensitivity", "step_up", "--approval-window", "5"],
        ["--sensitivity", "step_up", "--action-ttl", "0"],
        ["--sensitivity", "step_up", "--approval-window", "-600"],
    ],
)
def test_scope_set_refuses_bad_values_and_keeps_the_policy(db: None, args: list[str]) -> None:
    _run("scope_set", "ledger:write", "--audience", "http://ledger.test", "--sensitivity", "step_up")
    before = ScopePolicy.objects.values().get(name="ledger:write")
    _refused("scope_set", "ledger:write", "--audience", "http://other.test", *args)
    assert ScopePolicy.objects.values().get(name="ledger:write") == before


def test_scope_set_refuses_an_empty_audience(db: None) -> None:
    _refused("scope_set", "x:read", "--audience", "", "--sensitivity", "standard")
    assert not ScopePolicy.objects.filter(name="x:read").exists()


def test_changing_a_scope_to_step_up_moves_it_off_the_session_token(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    _run("scope_set", "budget:read", "--audience", "http://budget.test", "--sensitivity", "step_up")
    body = flow.full()
    assert body["scope"] == "catalog:read"
    assert "budget:read" not in _claims(body["access_token"])["scope"].split()
    assert SessionGrant.objects.get().step_up_scopes == ["budget:read", "ledger:write"]


# --- resource_server_create -----------------------------------------------------------------------


def test_resource_server_create_prints_working_credentials(flow: OAuthFlow, scenario: Scenario) -> None:
    out = _run_json("resource_server_create", "--name", "Budget", "--audience", "http://budget.test")
    assert set(out) == {"name", "audience", "client_id", "client_secret"}
    assert out["audience"] == "http://budget.test"
    rs = ResourceServer.objects.get(client_id=out["client_id"])
    assert rs.client_secret != out["client_secret"]  # stored hashed
    token = flow.full()["access_token"]
    body = _introspect(token, out["client_id"], out["client_secret"])
    assert body["active"] is True and "http://budget.test" in body["aud"]
    assert not _rs_authenticates(out["client_id"], out["client_secret"] + "x")
    assert AuditEvent.objects.filter(event="resource_server.created", client_id=out["client_id"]).count() == 1


def test_resource_server_create_without_json_shows_the_secret_once(db: None) -> None:
    out = _run("resource_server_create", "--name", "Budget", "--audience", "http://budget.test")
    rs = ResourceServer.objects.get()
    assert rs.client_id in out
    secret = out.split("client_secret:")[1].split()[0]
    assert _rs_authenticates(rs.client_id, secret)


def test_resource_server_create_refuses_a_duplicate_audience(scenario: Scenario) -> None:
    before = ResourceServer.objects.count()
    _refused("resource_server_create", "--name", "Catalog again", "--audience", "http://catalog.test")
    assert ResourceServer.objects.count() == before


# --- agent_create ---------------------------------------------------------------------------------


def test_agent_create_registers_a_working_agent(scenario: Scenario, tmp_path: Path) -> None:
    out = _run_json(
        "agent_create",
        "--name",
        "Travel Agent",
        "--publisher",
        "Trips Ltd",
        "--scopes",
        "catalog:read budget:read",
        "--redirect-uri",
        "http://127.0.0.1:8300/cb",
        "--redirect-uri",
        "https://travel.example/cb",
        "--refresh-mode",
        "none",
        "--ttl",
        "300",
        "--description",
        "Books trips",
    )
    assert set(out) >= {"name", "client_id", "client_secret", "redirect_uris", "scopes"}
    assert out["redirect_uris"] == ["http://127.0.0.1:8300/cb", "https://travel.example/cb"]
    assert out["scopes"] == ["catalog:read", "budget:read"]
    agent = Agent.objects.get(client_id=out["client_id"])
    assert (agent.name, agent.publisher, agent.refresh_mode, agent.access_token_ttl) == (
        "Travel Agent",
        "Trips Ltd",
        "none",
        300,
    )
    assert agent.status == Agent.Status.ACTIVE
    assert agent.client_secret != out["client_secret"]  # stored hashed
    assert _client_authenticates(out["client_id"], out["client_secret"])
    assert not _client_authenticates(out["client_id"], out["client_secret"][:-1])

    body = _session_token(
        username="officer",
        password="correct horse battery staple",
        client_id=out["client_id"],
        secret=out["client_secret"],
        scope="catalog:read",
        redirect_uri="http://127.0.0.1:8300/cb",
    )
    assert "refresh_token" not in body  # refresh mode none
    claims = _claims(body["access_token"])
    assert claims["exp"] - claims["iat"] == 300
    assert claims["act"] == {"sub": f"agent:{out['client_id']}"}


def test_agent_create_with_a_jwks_file(scenario: Scenario, tmp_path: Path) -> None:
    jwks = {
        "keys": [
            {
                "kty": "EC",
                "crv": "P-256",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
                "kid": "agent-key-1",
            }
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    out = _run_json(
        "agent_create",
        "--name",
        "Keyed",
        "--publisher",
        "P",
        "--scopes",
        "catalog:read",
        "--redirect-uri",
        REDIRECT_URI,
        "--jwks",
        str(path),
    )
    assert Agent.objects.get(client_id=out["client_id"]).jwks == jwks


@pytest.mark.parametrize("content", ["not json", json.dumps({"kty": "EC"}), json.dumps([1, 2])])
def test_agent_create_refuses_a_bad_jwks_file_and_registers_nothing(
    scenario: Scenario, tmp_path: Path, content: str
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    before = Agent.objects.count()
    _refused(
        "agent_create",
        "--name",
        "Keyed",
        "--publisher",
        "P",
        "--scopes",
        "catalog:read",
        "--redirect-uri",
        REDIRECT_URI,
        "--jwks",
        str(path),
    )
    assert Agent.objects.count() == before


def test_agent_create_refuses_a_missing_jwks_file(scenario: Scenario, tmp_path: Path) -> None:
    before = Agent.objects.count()
    _refused(
        "agent_create",
        "--name",
        "Keyed",
        "--publisher",
        "P",
        "--scopes",
        "catalog:read",
        "--redirect-uri",
        REDIRECT_URI,
        "--jwks",
        str(tmp_path / "nope.json"),
    )
    assert Agent.objects.count() == before


@pytest.mark.parametrize(
    "extra",
    [
        ["--scopes", "catalog:read payroll:write"],  # unknown scope
        ["--scopes", "catalog:read", "--ttl", "5"],  # below the 30 s minimum
        ["--scopes", "catalog:read", "--ttl", "0"],  # zero is not "the default"
        ["--scopes", "catalog:read", "--ttl", "-900"],
        ["--scopes", "catalog:read", "--refresh-mode", "forever"],
    ],
)
def test_agent_create_refuses_bad_settings_and_registers_nothing(
    scenario: Scenario, extra: list[str]
) -> None:
    before = Agent.objects.count()
    _refused("agent_create", "--name", "Bad", "--publisher", "P", "--redirect-uri", REDIRECT_URI, *extra)
    assert Agent.objects.count() == before


@pytest.mark.parametrize(
    "uri", ["javascript:alert(1)", "http://127.0.0.1:8300/cb#frag", "not a uri", "ftp://files.example/cb"]
)
def test_agent_create_refuses_unsafe_redirect_uris(scenario: Scenario, uri: str) -> None:
    before = Agent.objects.count()
    _refused(
        "agent_create", "--name", "Bad", "--publisher", "P", "--scopes", "catalog:read", "--redirect-uri", uri
    )
    assert Agent.objects.count() == before


# --- agent_update ---------------------------------------------------------------------------------


def test_agent_update_changes_ttl_refresh_mode_and_scopes(flow: OAuthFlow, scenario: Scenario) -> None:
    cid = scenario.agent.client_id
    out = _run("agent_update", cid, "--ttl", "600", "--refresh-mode", "exchange", "--scopes", "catalog:read")
    assert "access_token_ttl" in out
    agent = Agent.objects.get(client_id=cid)
    assert (agent.access_token_ttl, agent.refresh_mode, agent.allowed_scopes) == (
        600,
        "exchange",
        ["catalog:read"],
    )
    body = flow.full(scope="catalog:read")
    claims = _claims(body["access_token"])
    assert claims["exp"] - claims["iat"] == 600 and "refresh_token" not in body
    # budget:read left the registry: asking for it now is invalid_scope, no consent screen
    _, challenge = pkce_pair()
    response = flow.client.get(
        "/o/authorize/?" + flow.authorize_query(challenge=challenge, scope="catalog:read budget:read")
    )
    assert response.status_code == 302 and "error=invalid_scope" in response["Location"]
    assert AuditEvent.objects.filter(event="agent.changed", client_id=cid).count() == 1


def test_agent_update_to_exchange_mode_stops_existing_refresh_tokens(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    body = flow.full()
    _run("agent_update", scenario.agent.client_id, "--refresh-mode", "exchange")
    response = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


def test_agent_update_suspended_kills_tokens_and_client_authentication(
    flow: OAuthFlow, scenario: Scenario
) -> None:
    body = flow.full()
    assert flow.introspect(body["access_token"]).json()["active"] is True
    _run("agent_update", scenario.agent.client_id, "--status", "suspended")

    assert Agent.objects.get(pk=scenario.agent.pk).status == Agent.Status.SUSPENDED
    assert flow.introspect(body["access_token"]).json() == {"active": False}
    response = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert not _client_authenticates(scenario.agent.client_id, scenario.agent_secret)
    grant = SessionGrant.objects.get()
    assert grant.status == SessionGrant.Status.REVOKED and grant.end_reason == "agent_suspended"
    # and it cannot start a new session either
    _, challenge = pkce_pair()
    page = flow.client.get("/o/authorize/?" + flow.authorize_query(challenge=challenge))
    assert page.status_code == 400 and not page.has_header("Location")


def test_reactivating_an_agent_does_not_resurrect_old_tokens(flow: OAuthFlow, scenario: Scenario) -> None:
    body = flow.full()
    _run("agent_update", scenario.agent.client_id, "--status", "suspended")
    _run("agent_update", scenario.agent.client_id, "--status", "active")
    assert _client_authenticates(scenario.agent.client_id, scenario.agent_secret)
    assert flow.introspect(body["access_token"]).json() == {"active": False}
    response = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    # a fresh consent works again
    assert flow.introspect(flow.full()["access_token"]).json()["active"] is True


@pytest.mark.parametrize(
    "args",
    [
        ["--ttl", "5"],
        ["--ttl", "0"],
        ["--scopes", "catalog:read payroll:write"],
        ["--status", "deleted"],
        ["--refresh-mode", "forever"],
        [],
    ],
)
def test_agent_update_refuses_bad_changes_and_keeps_the_agent(scenario: Scenario, args: list[str]) -> None:
    before = Agent.objects.values().get(pk=scenario.agent.pk)
    _refused("agent_update", scenario.agent.client_id, *args)
    assert Agent.objects.values().get(pk=scenario.agent.pk) == before


def test_agent_update_of_an_unknown_agent_is_refused(scenario: Scenario) -> None:
    _refused("agent_update", "no-such-client", "--ttl", "600")


# --- seed_demo ------------------------------------------------------------------------------------

SEED_SCOPES = {
    "catalog:read": "standard",
    "budget:read": "standard",
    "po:draft": "standard",
    "approval:route": "standard",
    "ledger:write": "step_up",
}
# The MCP server of examples/mcp: its own scopes; MCP clients join by themselves (no seeded agent).
MCP_SCOPES = {"shop:catalog": "standard", "shop:ledger": "step_up"}


def test_seed_demo_json_has_the_documented_shape(db: None) -> None:
    out = _run_json("seed_demo")
    assert set(out) == {"issuer", "users", "agents", "resource_servers", "scopes"}
    assert out["issuer"] == "http://127.0.0.1:8000"

    officer = next(u for u in out["users"] if u["username"] == "officer")
    assert set(officer) == {"username", "password"} and officer["password"]
    assert get_user_model().objects.get(username="officer").check_password(officer["password"])

    (agent,) = out["agents"]
    assert set(agent) == {"name", "client_id", "client_secret", "redirect_uris", "scopes"}
    assert sorted(agent["scopes"]) == sorted(SEED_SCOPES)
    assert agent["redirect_uris"] and all(isinstance(u, str) for u in agent["redirect_uris"])
    seeded = Agent.objects.get(client_id=agent["client_id"])
    assert seeded.refresh_mode == "rotating" and seeded.access_token_ttl == 900

    assert len(out["resource_servers"]) == 6
    for rs in out["resource_servers"]:
        assert set(rs) == {"name", "audience", "client_id", "client_secret"}
    assert "http://127.0.0.1:8110/mcp" in {rs["audience"] for rs in out["resource_servers"]}
    assert {s["name"]: s["sensitivity"] for s in out["scopes"]} == SEED_SCOPES | MCP_SCOPES
    for s in out["scopes"]:
        assert set(s) == {"name", "sensitivity", "audience"}
    audiences = {rs["audience"] for rs in out["resource_servers"]}
    assert {s["audience"] for s in out["scopes"]} == audiences

    ledger = ScopePolicy.objects.get(name="ledger:write")
    assert (ledger.approval_window, ledger.action_token_ttl, ledger.auto_approve_rule) == (600, 120, "")
    assert ledger.authorization_details_types == ["ledger_entry"]


def test_seed_demo_credentials_drive_the_whole_flow(db: None) -> None:
    out = _run_json("seed_demo")
    officer = next(u for u in out["users"] if u["username"] == "officer")
    agent = out["agents"][0]
    body = _session_token(
        username="officer",
        password=officer["password"],
        client_id=agent["client_id"],
        secret=agent["client_secret"],
        scope=" ".join(agent["scopes"]),
        redirect_uri=agent["redirect_uris"][0],
    )
    claims = _claims(body["access_token"])
    assert "ledger:write" not in claims["scope"].split()
    catalog = next(
        rs
        for rs in out["resource_servers"]
        if rs["audience"] == next(s["audience"] for s in out["scopes"] if s["name"] == "catalog:read")
    )
    assert _introspect(body["access_token"], catalog["client_id"], catalog["client_secret"])["active"] is True
    ledger = next(
        rs
        for rs in out["resource_servers"]
        if rs["audience"] == next(s["audience"] for s in out["scopes"] if s["name"] == "ledger:write")
    )
    assert _introspect(body["access_token"], ledger["client_id"], ledger["client_secret"]) == {
        "active": False
    }


def test_seed_demo_is_idempotent_and_keeps_the_secrets_it_issued(db: None) -> None:
    first = _run_json("seed_demo")
    counts = (
        get_user_model().objects.count(),
        Agent.objects.count(),
        ResourceServer.objects.count(),
        ScopePolicy.objects.count(),
    )
    second = _run_json("seed_demo")
    assert (
        get_user_model().objects.count(),
        Agent.objects.count(),
        ResourceServer.objects.count(),
        ScopePolicy.objects.count(),
    ) == counts

    a1, a2 = first["agents"][0], second["agents"][0]
    assert a2["client_id"] == a1["client_id"]
    assert a2["client_secret"] is None  # stored hashed: it cannot be shown again
    assert _client_authenticates(a1["client_id"], a1["client_secret"])  # the reader's copy still works
    rs1 = {r["audience"]: r for r in first["resource_servers"]}
    for rs in second["resource_servers"]:
        assert rs["client_id"] == rs1[rs["audience"]]["client_id"] and rs["client_secret"] is None
        assert _rs_authenticates(rs["client_id"], rs1[rs["audience"]]["client_secret"])
    assert "stored hashed" in _run("seed_demo")


def test_seed_demo_rotate_secrets_issues_fresh_working_ones(db: None) -> None:
    first = _run_json("seed_demo")
    second = _run_json("seed_demo", "--rotate-secrets")
    a1, a2 = first["agents"][0], second["agents"][0]
    assert a2["client_id"] == a1["client_id"] and a2["client_secret"] != a1["client_secret"]
    assert _client_authenticates(a2["client_id"], a2["client_secret"])
    assert not _client_authenticates(a1["client_id"], a1["client_secret"])  # the old one was replaced
    rs1 = {r["audience"]: r for r in first["resource_servers"]}
    for rs in second["resource_servers"]:
        assert rs["client_id"] == rs1[rs["audience"]]["client_id"]
        assert _rs_authenticates(rs["client_id"], rs["client_secret"])
        assert not _rs_authenticates(rs["client_id"], rs1[rs["audience"]]["client_secret"])
    officer = next(u for u in second["users"] if u["username"] == "officer")
    assert get_user_model().objects.get(username="officer").check_password(officer["password"])


def test_seed_demo_reports_the_scopes_the_database_holds(db: None) -> None:
    _run_json("seed_demo")
    _run("scope_set", "catalog:read", "--audience", "http://127.0.0.1:8101", "--sensitivity", "step_up")
    out = _run_json("seed_demo")
    assert {s["name"]: s["sensitivity"] for s in out["scopes"]}["catalog:read"] == "step_up"


def test_seed_demo_keeps_what_an_admin_changed(db: None) -> None:
    _run_json("seed_demo")
    _run(
        "scope_set",
        "ledger:write",
        "--audience",
        "http://127.0.0.1:8105",
        "--sensitivity",
        "step_up",
        "--approval-window",
        "900",
    )
    user = get_user_model().objects.get(username="officer")
    user.set_password("officer's own password")
    user.save()
    out = _run_json("seed_demo")
    assert ScopePolicy.objects.get(name="ledger:write").approval_window == 900
    officer = next(u for u in out["users"] if u["username"] == "officer")
    assert not get_user_model().objects.get(username="officer").check_password(officer["password"])
    assert get_user_model().objects.get(username="officer").check_password("officer's own password")


def test_seed_demo_without_json_prints_logins(db: None) -> None:
    out = _run("seed_demo")
    assert "officer" in out and Agent.objects.get().client_id in out

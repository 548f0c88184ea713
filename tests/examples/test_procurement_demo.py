"""The procurement demo (examples/procurement/) end to end, with real processes only.

- Countersign itself: the ``live`` stack (the servers + a Celery worker on the test database);
- the five downstream systems: ``python -m examples.procurement.resource_servers`` as a
  subprocess on free loopback ports, with their own resource-server credentials;
- the agent: ``examples.procurement.agent.run`` (countersign's ``AgentClient``) in a thread,
  listening on its own loopback redirect URI;
- the officer: a real Chromium signs in, clicks **Allow** on the consent screen, and later
  **Approve** on the ledger prompt in the live inbox.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from playwright.sync_api import BrowserContext, Page, expect

from approvals.models import ActionToken, ApprovalRequest
from audit.models import AuditEvent
from consent.models import Agent, ScopePolicy
from consent.services import agent_create, resource_server_create, scope_set
from countersign import AgentClient, AlreadyRedeemed, DPoPKey, TokenVerifier, action_hash
from examples.procurement import agent as procurement_agent
from examples.procurement.config import SYSTEMS
from tests.browser.conftest import chromium, live_context, watch_page  # noqa: F401  (fixtures)
from tests.conftest import PASSWORD
from tests.live import ROOT, LiveStack, free_port

pytestmark = pytest.mark.django_db(transaction=True)

PO = "PO-2026-0142"  # the first draft of a fresh drafting store
APPROVED = {
    "type": "ledger_entry",
    "actions": ["append"],
    "purchase_order": PO,
    "vendor": "Acme Office Supply",
    "amount": "4250.00",
    "currency": "USD",
}  # 25 x 170.00
HEADLINE = re.compile(r"^Append 4250\.00 USD to Acme Office Supply \(PO-2026-0142\)")
TRAIL = [
    "consent.given",
    "token.issued",
    "approval.requested",
    "approval.approved",
    "action_token.issued",
    "action_token.redeemed",
]


def _http() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10)


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture
def demo_config(live: LiveStack, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """The registry, created through the consent services with the audiences the resource-server
    process will listen on, written in seed_demo --json's shape for the example's --config."""
    *rs_ports, callback_port = _free_ports(len(SYSTEMS) + 1)
    scopes, servers = [], []
    for (key, scope, title), port in zip(SYSTEMS, rs_ports, strict=True):
        audience = f"http://127.0.0.1:{port}"
        values: dict[str, Any] = {
            "audience": audience,
            "description": title,
            "sensitivity": ScopePolicy.Sensitivity.STANDARD,
        }
        if key == "ledger":
            values |= {
                "sensitivity": ScopePolicy.Sensitivity.STEP_UP,
                "approval_window": 600,
                "action_token_ttl": 120,
                "authorization_details_types": ["ledger_entry"],
            }
        scope_set(name=scope, values=values)
        rs, secret = resource_server_create(name=title, audience=audience)
        scopes.append({"name": scope, "sensitivity": values["sensitivity"], "audience": audience})
        servers.append(
            {"name": title, "audience": audience, "client_id": rs.client_id, "client_secret": secret}
        )
    redirect_uri = f"http://127.0.0.1:{callback_port}/callback"
    agent, secret = agent_create(
        name="Procurement Agent",
        publisher="Countersign reference scenario",
        scopes=[s["name"] for s in scopes],
        redirect_uris=[redirect_uri],
    )
    get_user_model().objects.create_user(
        "officer", password=PASSWORD, first_name="Contracting", last_name="Officer"
    )
    config = {
        "issuer": live.url,
        "users": [{"username": "officer", "password": PASSWORD}],
        "agents": [
            {
                "name": agent.name,
                "client_id": agent.client_id,
                "client_secret": secret,
                "redirect_uris": [redirect_uri],
                "scopes": [s["name"] for s in scopes],
            }
        ],
        "resource_servers": servers,
        "scopes": scopes,
    }
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return config, path


class Systems:
    def __init__(
        self, proc: subprocess.Popen[bytes], log: Path, data_dir: Path, config: dict[str, Any]
    ) -> None:
        self.proc, self.log, self.data_dir, self.config = proc, log, data_dir, config
        self.audience = {s["name"]: s["audience"] for s in config["scopes"]}
        self.ledger = next(
            s for s in config["resource_servers"] if s["audience"] == self.audience["ledger:write"]
        )

    def output(self) -> str:
        return self.log.read_text()

    def ledger_lines(self) -> list[dict[str, Any]]:
        path = self.data_dir / "ledger.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def systems(live: LiveStack, demo_config: tuple[dict[str, Any], Path], tmp_path: Path) -> Iterator[Systems]:
    """The five systems as one real subprocess (uvicorn, five sockets), on the config's ports."""
    config, path = demo_config
    log, data_dir = tmp_path / "systems.log", tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.procurement.resource_servers",
            "--config",
            str(path),
            "--data-dir",
            str(data_dir),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle = Systems(proc, log, data_dir, config)
    try:
        deadline = time.monotonic() + 30
        with _http() as http:
            for scope in config["scopes"]:
                while True:
                    if proc.poll() is not None:
                        pytest.fail(f"the resource servers exited ({proc.returncode}):\n{handle.output()}")
                    try:
                        if http.get(f"{scope['audience']}/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        pytest.fail(f"the resource servers did not start:\n{handle.output()}")
                    time.sleep(0.1)
        yield handle
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _sign_in_and_allow(page: Page, url: str, live: LiveStack) -> None:
    page.goto(url)
    page.wait_for_url(re.compile(r"/accounts/login/\?"))
    page.get_by_label("Username").fill("officer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/o/authorize/\?"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Procurement Agent wants to act for you")
    allowed = page.get_by_role("list", name="Allowed for this session")
    expect(allowed.get_by_role("listitem")).to_have_count(4)
    expect(page.get_by_role("list", name="Will ask you each time")).to_contain_text("ledger:write")
    page.get_by_role("button", name="Allow").click()
    # The agent's own redirect URI answers (a real http.server), then sends the officer on to the inbox.
    expect(page.get_by_role("heading", level=1)).to_have_text("Procurement Agent connected")
    page.wait_for_url(f"{live.url}/approvals/")


@pytest.mark.browser
def test_procurement_demo_runs_end_to_end(
    live: LiveStack,
    live_context: BrowserContext,  # noqa: F811
    demo_config: tuple[dict[str, Any], Path],
    systems: Systems,
) -> None:
    config, _ = demo_config
    page = live_context.new_page()
    problems = watch_page(page)

    consent_urls: queue.Queue[str] = queue.Queue()
    said: list[str] = []
    outcome: dict[str, Any] = {}

    def agent_thread() -> None:
        try:
            outcome["result"] = procurement_agent.run(
                config,
                say=said.append,
                on_consent_url=consent_urls.put,
                consent_timeout=90,
                approval_timeout=90,
                # kept live so the one-shot checks below reach the
                # redemption itself (an ended grant refuses first)
                end_session=False,
            )
        except BaseException as exc:  # noqa: BLE001  (reported below)
            outcome["error"] = exc

    thread = threading.Thread(target=agent_thread, name="procurement-agent", daemon=True)
    thread.start()
    try:
        url = consent_urls.get(timeout=30)
    except queue.Empty:
        pytest.fail(f"the agent printed no consent link: {outcome} {said}")
    assert url.startswith(f"{live.url}/o/authorize/?") and "code_challenge_method=S256" in url

    # Consent once, in the browser.
    _sign_in_and_allow(page, url, live)

    # Steps 1-4 run on the session token; step 5 arrives in the live inbox. Approve exactly it.
    heading = page.get_by_role("heading", name=HEADLINE)
    expect(heading).to_be_visible(timeout=30_000)
    prompt = page.locator("#prompts li.prompt").filter(has=heading)
    expect(prompt).to_have_count(1)
    expect(prompt).to_contain_text("Procurement Agent")
    expect(prompt.locator(".agent-note q")).to_have_text(f"Step 5 of 5: record {PO}")
    prompt.get_by_role("button", name="Approve").click()
    page.wait_for_url(f"{live.url}/approvals/")
    expect(page.get_by_role("status").filter(has_text="Approved:")).to_contain_text("Acme Office Supply")

    thread.join(timeout=60)
    assert not thread.is_alive(), f"the agent did not finish: {said}\n{systems.output()}\n{live.logs()}"
    assert "error" not in outcome, (repr(outcome.get("error")), said, systems.output(), live.logs())
    result = outcome["result"]
    transcript = "\n".join(said)
    print(transcript)  # shown with -rP: what a user of `make demo` sees
    for n in range(1, 6):
        assert f"[{n}/5 " in transcript, transcript

    # The ledger wrote exactly one entry: the approved one, and persisted it.
    assert result.ledger_status == 201
    assert result.entry == APPROVED
    lines = systems.ledger_lines()
    assert len(lines) == 1, lines
    written = lines[0]
    assert written["entry"] == APPROVED and written["entry"]["amount"] == "4250.00"
    approval = ApprovalRequest.objects.get()
    assert written["approval_id"] == str(approval.pk)
    assert written["action_hash"] == action_hash([APPROVED]) == approval.action_hash
    user = get_user_model().objects.get(username="officer")
    agent_id = f"agent:{config['agents'][0]['client_id']}"
    assert written["user"] == f"user:{user.pk}" and written["agent"] == agent_id
    with _http() as http:
        ledger_url = f"{systems.audience['ledger:write']}/entries"
        listed = http.get(ledger_url).json()
        assert listed["count"] == 1 and listed["entries"][0]["entry"] == APPROVED
        # Without a token, every session-token system refuses.
        for scope in ("catalog:read", "budget:read", "po:draft", "approval:route"):
            refused = http.get(systems.audience[scope] + "/", headers={})
            assert refused.status_code == 401, (scope, refused.text)
        # A different entry under the same approval: refused before any redemption (action hash).
        tampered = http.post(
            ledger_url,
            json={**APPROVED, "amount": "42500.00"},
            headers={"Authorization": f"Bearer {result.action_token.token}"},
        )
        assert tampered.status_code == 403 and tampered.json()["error"] == "insufficient_scope", tampered.text
    # Each system checked both principals itself: its access log names the user and the agent.
    log = systems.output()
    for name in ("catalog", "budget", "drafting", "routing", "ledger"):
        assert re.search(
            rf"\[{name}\s*\] (GET|POST) /\S* -> 20[01]  user:{user.pk} via {re.escape(agent_id)}", log
        ), log

    # One shot: the agent's second use was refused by the ledger, and so is any later redemption.
    assert result.replay_status == 401, result.replay_body
    assert "already redeemed" in result.replay_body["error_description"]
    verifier = TokenVerifier(
        live.url,
        audience=systems.ledger["audience"],
        client_id=systems.ledger["client_id"],
        client_secret=systems.ledger["client_secret"],
        http=_http(),
    )
    with pytest.raises(AlreadyRedeemed):
        verifier.redeem(result.action_token.token, action_hash=action_hash([APPROVED]))
    with pytest.raises(AlreadyRedeemed):
        verifier.verify_action(result.action_token.token, expected_details=[APPROVED])
    assert len(systems.ledger_lines()) == 1
    token = ActionToken.objects.get()
    assert token.redeemed_at is not None and token.jti == written["token_jti"]
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.REDEEMED

    # The audit trail: every step, in order, on an intact hash chain.
    trail = list(AuditEvent.objects.order_by("id").values_list("event", flat=True))
    assert all(event in trail for event in TRAIL), trail
    positions = [trail.index(event) for event in TRAIL]
    assert positions == sorted(positions), trail
    assert trail.count("action_token.redeemed") == 1, trail
    assert "redemption.refused" in trail[trail.index("action_token.redeemed") :], trail
    call_command("audit_verify", stdout=StringIO())

    # ... which the officer can read on /activity/.
    page.goto("/activity/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Activity")
    for event in ("consent.given", "approval.approved", "action_token.redeemed"):
        expect(page.locator(f'li[data-event="{event}"]').first).to_be_visible()
    expect(page.locator('li[data-event="action_token.redeemed"]').first).to_contain_text(
        re.compile(
            rf"Procurement Agent wrote {APPROVED['amount']} {APPROVED['currency']} to .+, "
            r"approved by you with password"
        )
    )
    assert problems == [], problems


def test_systems_hold_dpop_bound_tokens_to_their_key(
    live: LiveStack, demo_config: tuple[dict[str, Any], Path], systems: Systems, client: Client
) -> None:
    """Sender-constrained tokens (RFC 9449) through the same systems: the session token and the
    action token are bound to the agent's registered key; a proof for another request, a replayed
    proof, or the bound token sent as a plain bearer token are all refused before anything runs."""
    config, _ = demo_config
    me = config["agents"][0]
    key = DPoPKey.generate()
    registered = Agent.objects.get(client_id=me["client_id"])
    registered.jwks = {"keys": [key.jwk]}
    registered.save()
    agent = AgentClient(
        live.url,
        me["client_id"],
        client_secret=me["client_secret"],
        redirect_uri=me["redirect_uris"][0],
        dpop_key=key,
        http=_http(),
    )
    url, state, verifier = agent.authorization_url(me["scopes"])

    # The officer consents (Django's test client on the same database); the live server mints.
    assert client.login(username="officer", password=PASSWORD)
    consent = client.post(
        "/o/authorize/", {"authz_query": urlsplit(url).query, "decision": "allow", "lifetime": "3600"}
    )
    assert consent.status_code == 302, consent.content[:500]
    answer = parse_qs(urlsplit(consent["Location"]).query)
    assert answer["state"] == [state]
    tokens = agent.exchange_code(answer["code"][0], verifier)
    assert tokens.dpop_bound

    with _http() as http:
        catalog = f"{systems.audience['catalog:read']}/items"
        headers = agent.headers_for("GET", catalog)
        found = http.get(catalog, params={"q": "standing desk"}, headers=headers)
        assert found.status_code == 200, found.text
        assert found.json()["checked"]["dpop_bound"] is True
        replayed = http.get(catalog, params={"q": "standing desk"}, headers=headers)
        assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_dpop_proof", replayed.text
        as_bearer = http.get(catalog, headers={"Authorization": f"Bearer {tokens.access_token}"})
        assert as_bearer.status_code == 401 and as_bearer.headers["www-authenticate"].startswith("DPoP ")

        # Step 5 with a bound action token.
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(
                action=agent.request_approval("ledger:write", [APPROVED], timeout=60)
            ),
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + 20
        while not ApprovalRequest.objects.exists():
            assert time.monotonic() < deadline and thread.is_alive(), "the approval request never arrived"
            time.sleep(0.1)
        approved = client.post(f"/approvals/{ApprovalRequest.objects.get().pk}/approve/")
        assert approved.status_code == 302
        thread.join(timeout=30)
        action = outcome["action"]
        assert action.dpop_bound

        ledger = f"{systems.audience['ledger:write']}/entries"
        wrong_target = http.post(
            ledger, json=APPROVED, headers=agent.auth_headers("POST", catalog, token=action)
        )
        assert wrong_target.status_code == 401 and wrong_target.json()["error"] == "invalid_dpop_proof"
        assert ActionToken.objects.get().redeemed_at is None  # refused before redemption
        written = http.post(ledger, json=APPROVED, headers=agent.auth_headers("POST", ledger, token=action))
        assert written.status_code == 201, written.text
        assert written.json()["checked"]["dpop_bound"] is True
    assert [line["entry"] for line in systems.ledger_lines()] == [APPROVED]
    assert ActionToken.objects.get().redeemed_at is not None
    call_command("audit_verify", stdout=StringIO())
    agent.close()

"""Scale-out (DESIGN.md): two ASGI nodes and one Celery worker over one PostgreSQL and one Redis.

No state lives in a process: a prompt requested through node A reaches an inbox open on node B
(in a real Chromium), the officer approves there, the agent collects through node A. And a node
that dies (SIGKILL) loses nothing: its clients reconnect to the other node and get every pending
prompt replayed from the database.
"""

import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from django.conf import settings as django_settings
from playwright.sync_api import Browser, expect
from pytest_django import DjangoDbBlocker, Settings

from approvals.models import ActionToken, ApprovalRequest
from approvals.rar import action_hash
from config.celery import app as celery_app
from consent.models import ScopePolicy
from tests.approvals.conftest import LEDGER_ENTRY
from tests.browser.conftest import chromium, watch_page  # noqa: F401  (fixture)
from tests.conftest import PASSWORD, OAuthFlow, Scenario
from tests.live import _database_url, free_port, wait_for_idle_workers
from tests.ops.support import (
    AgentHTTP,
    Cluster,
    Officer,
    ReconnectingInbox,
    cluster_env,
    ledger_entry,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True)]

HEADLINE = "Append 4250.00 USD to Acme Office Supply (PO-2026-0142) — Financial ledger"
LIVE_STATUS = "Live: new requests appear here as they come in."


@pytest.fixture(scope="session")
def two_nodes(
    django_db_setup: None, django_db_blocker: DjangoDbBlocker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Node A and node B (each web + ws behind the path router) and one Celery worker; the issuer is node A's URL for both."""
    with django_db_blocker.unblock():
        database_url = _database_url()
    port_a = free_port()
    env = cluster_env(
        issuer=f"http://127.0.0.1:{port_a}", redis_url=django_settings.REDIS_URL, database_url=database_url
    )
    cluster = Cluster(env, tmp_path_factory.mktemp("multinode"))
    celery_app.control.purge()
    try:
        cluster.add_node("A", port_a)
        a = cluster.start_node("A", wait=False)
        b = cluster.start_node("B", wait=False)
        cluster.start_worker("w1", wait=False)
        cluster.wait_node(a)
        cluster.wait_node(b)
        wait_for(lambda: "ready." in cluster.workers["w1"].tail(200_000), "celery worker", 120, cluster.logs)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def multinode(two_nodes: Cluster, transactional_db: None, settings: Settings) -> Iterator[Cluster]:
    """The two-node cluster, with this process issuing tokens under node A's issuer; the worker
    finishes its tasks before ``transactional_db`` flushes the tables."""
    issuer = two_nodes.nodes["A"].url
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "ISSUER": issuer}
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": issuer}
    for node in two_nodes.nodes.values():  # a node a test killed comes back for the next test
        if node.proc is None or not node.proc.alive:
            two_nodes.start_node(node.name)
    yield two_nodes
    wait_for_idle_workers()


@pytest.fixture
def session_token(multinode: Cluster, flow: OAuthFlow, ledger_policy: ScopePolicy) -> str:
    token: str = flow.full()["access_token"]
    flow.client.logout()
    return token


@pytest.fixture
def agent(scenario: Scenario, session_token: str) -> Iterator[AgentHTTP]:
    a = AgentHTTP(scenario, session_token)
    try:
        yield a
    finally:
        a.close()


def _verify_action_token(token: str, issuer: str, node_url: str) -> dict[str, Any]:
    from tests.ops.support import http

    with http() as client:
        jwks = client.get(f"{node_url}/.well-known/jwks.json").json()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "action+jwt"
    key = jwt.PyJWK({k["kid"]: k for k in jwks["keys"]}[header["kid"]])
    return jwt.decode(token, key, algorithms=[header["alg"]], issuer=issuer, audience="http://ledger.test")


@pytest.mark.browser
def test_prompt_requested_on_node_a_is_approved_in_a_browser_on_node_b(
    multinode: Cluster,
    chromium: Browser,  # noqa: F811
    scenario: Scenario,  # noqa: F811
    agent: AgentHTTP,
) -> None:
    a, b = multinode.nodes["A"], multinode.nodes["B"]
    context = chromium.new_context(base_url=b.url)
    context.set_default_timeout(30_000)
    try:
        page = context.new_page()
        problems = watch_page(page)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))

        # The officer signs in on node B and keeps the inbox open there.
        page.goto("/approvals/")
        page.wait_for_url(re.compile(r"/accounts/login/\?"))
        page.get_by_label("Username").fill("officer")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{b.url}/approvals/")
        expect(page.locator("#live-status")).to_have_text(LIVE_STATUS)  # websocket open, on node B
        expect(page.locator("#empty")).to_be_visible()
        page.evaluate("window.__sameDocument = true")
        assert sockets and all(url.startswith(b.ws_url.rsplit("/ws/", 1)[0]) for url in sockets), sockets

        # The agent asks through node A; the prompt appears on node B without a reload.
        asked = agent.ask(a.url, LEDGER_ENTRY, binding_message="step 5 via node A")
        assert asked.status_code == 200, asked.text
        auth_req_id = asked.json()["auth_req_id"]
        expect(page.get_by_role("heading", name=HEADLINE)).to_be_visible()
        expect(page.locator("#prompts li.prompt")).to_have_count(1)
        expect(page.locator("#pending-badge")).to_have_text("1")
        assert page.evaluate("window.__sameDocument === true"), "the prompt appeared only after a reload"
        pending = agent.poll(a.url, auth_req_id)
        assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending", pending.text

        # The officer approves on node B.
        page.get_by_role("button", name="Approve").click()
        page.wait_for_url(f"{b.url}/approvals/")
        expect(page.get_by_role("status").filter(has_text="Approved:")).to_contain_text(HEADLINE)
        expect(page.locator("#prompts li.prompt")).to_have_count(0)

        # The agent, polling node A, collects the action token; the ledger redeems it (on node B).
        collected = agent.poll(a.url, auth_req_id)
        assert collected.status_code == 200, collected.text
        token = collected.json()["access_token"]
        claims = _verify_action_token(token, a.url, b.url)
        approval = ApprovalRequest.objects.get()
        assert claims["approval_id"] == str(approval.pk)
        assert claims["action_hash"] == action_hash([LEDGER_ENTRY])
        assert approval.decided_by_id == scenario.user.pk and approval.decision_method == "browser"
        redeemed = agent.redeem(b.url, token)
        assert redeemed.status_code == 200 and redeemed.json()["redeemed"] is True, redeemed.text
        assert agent.redeem(a.url, token).status_code == 400  # once, whichever node is asked
        assert ActionToken.objects.filter(approval=approval, redeemed_at__isnull=False).count() == 1
        assert problems == [], problems
    finally:
        context.close()


def test_a_prompt_and_its_removal_reach_inboxes_on_both_nodes(
    multinode: Cluster, scenario: Scenario, agent: AgentHTTP
) -> None:
    a, b = multinode.nodes["A"], multinode.nodes["B"]
    officer = Officer(a.url, "officer", PASSWORD)
    on_a = ReconnectingInbox([a.url], officer.cookie, "inbox-on-A")
    on_b = ReconnectingInbox([b.url], officer.cookie, "inbox-on-B")
    try:
        for inbox in (on_a, on_b):
            inbox.wait(lambda i: i.snapshots >= 1, "snapshot", logs=multinode.logs)
        asked = agent.ask(b.url, ledger_entry(1))
        assert asked.status_code == 200, asked.text
        approval = ApprovalRequest.objects.get()
        for inbox in (on_a, on_b):
            inbox.wait(lambda i: str(approval.pk) in i.pending, "the prompt", logs=multinode.logs)
        assert officer.approve(str(approval.pk), b.url).status_code == 302
        for inbox in (on_a, on_b):
            inbox.wait(lambda i: not i.pending, "the prompt's removal", logs=multinode.logs)
        assert agent.poll(a.url, asked.json()["auth_req_id"]).status_code == 200
    finally:
        on_a.close()
        on_b.close()
        officer.close()


def test_killed_node_loses_no_prompt_its_clients_reconnect_to_the_other(
    multinode: Cluster, scenario: Scenario, agent: AgentHTTP
) -> None:
    a, b = multinode.nodes["A"], multinode.nodes["B"]
    officer = Officer(b.url, "officer", PASSWORD)
    # A tab whose load balancer put it on node B; when B is gone it gets node A.
    inbox = ReconnectingInbox([b.url, a.url], officer.cookie, "tab")
    try:
        inbox.wait(
            lambda i: i.connected_to == b.url and i.snapshots == 1, "connect to node B", logs=multinode.logs
        )
        first = agent.ask(a.url, ledger_entry(1))
        assert first.status_code == 200, first.text
        first_id = str(ApprovalRequest.objects.get().pk)
        inbox.wait(lambda i: first_id in i.pending, "the first prompt on node B", logs=multinode.logs)

        assert b.proc is not None
        b.proc.kill(signal.SIGKILL)  # no shutdown, no close frames: the node is simply gone

        inbox.wait(
            lambda i: i.connected_to == a.url and i.snapshots >= 2, "reconnect to node A", logs=multinode.logs
        )
        inbox.wait(
            lambda i: first_id in i.pending, "the pending prompt replayed by node A", logs=multinode.logs
        )
        assert inbox.last_snapshot == [first_id] and inbox.connects >= 2

        # Node B's dead channel is still in the user's group; delivery to the live one is unaffected.
        second = agent.ask(a.url, ledger_entry(2))
        assert second.status_code == 200, second.text
        second_id = str(ApprovalRequest.objects.exclude(pk=first_id).get().pk)
        inbox.wait(lambda i: second_id in i.pending, "a new prompt live on node A", logs=multinode.logs)

        for approval_id, asked in ((first_id, first), (second_id, second)):
            assert officer.approve(approval_id, a.url).status_code == 302
            collected = agent.poll(a.url, asked.json()["auth_req_id"])
            assert collected.status_code == 200, collected.text
            assert agent.redeem(a.url, collected.json()["access_token"]).status_code == 200
        inbox.wait(lambda i: not i.pending, "removals", logs=multinode.logs)
        assert ActionToken.objects.count() == 2
        assert set(ApprovalRequest.objects.values_list("status", flat=True)) == {"redeemed"}
    finally:
        inbox.close()
        officer.close()
        if b.proc is None or not b.proc.alive:  # the session's cluster keeps its two nodes
            multinode.start_node("B")


def test_an_idle_inbox_websocket_stays_open(multinode: Cluster, scenario: Scenario, agent: AgentHTTP) -> None:
    a = multinode.nodes["A"]
    officer = Officer(a.url, "officer", PASSWORD)
    tab = ReconnectingInbox([a.url], officer.cookie, "idle-tab")
    try:
        tab.wait(lambda i: i.snapshots == 1, "snapshot", logs=multinode.logs)
        time.sleep(16)  # idle through three of channels_redis' 5 s receive cycles
        asked = agent.ask(a.url, ledger_entry(1, "IDLE"))
        assert asked.status_code == 200, asked.text
        tab.wait(lambda i: len(i.upserts) == 1, "the prompt, live", logs=multinode.logs)
        assert tab.connects == 1, tab.history
    finally:
        tab.close()
        officer.close()

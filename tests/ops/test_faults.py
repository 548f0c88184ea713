"""Faults with real processes (SECURITY.md "Faults"): a Celery worker SIGKILLed mid-delivery, Redis
restarted under open inboxes, PostgreSQL unreachable. Every test runs its own server node (web + ws
behind the path router) and Celery processes on a Redis of its own (never the shared one), over the
test's PostgreSQL database.

The bar: 0 lost approvals (every pending prompt reaches the inbox, live or replayed from the database
on reconnect), 0 duplicate deliveries in the audit trail, 0 duplicate action tokens, and nothing
half-written when the database goes away.
"""

import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from kombu import pools as kombu_pools
from pytest_django import Settings

from approvals import delivery
from approvals.ciba import validate_backchannel_request
from approvals.models import ActionToken, ApprovalRequest
from approvals.services import approval_request_create, auth_req_id_for
from audit.models import AuditEvent
from config.celery import app as celery_app
from consent.models import ScopePolicy
from tests.conftest import PASSWORD, OAuthFlow, Scenario
from tests.live import _database_url, free_port
from tests.ops.support import (
    AgentHTTP,
    Cluster,
    Officer,
    PrivateRedis,
    ReconnectingInbox,
    TcpForwarder,
    cluster_env,
    http,
    ledger_entry,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True)]


class FaultStack(Cluster):
    """A cluster on a private Redis; forwarders in front of PostgreSQL are closed with it."""

    redis: PrivateRedis
    forwarders: list[TcpForwarder]

    def forward_database(self, latency: float = 0.0) -> tuple[TcpForwarder, str]:
        from django.db import connection

        db = connection.settings_dict
        forwarder = TcpForwarder((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)), latency=latency)
        self.forwarders.append(forwarder)
        return forwarder, forwarder.url_for(_database_url())


@pytest.fixture
def stack(transactional_db: None, settings: Settings, tmp_path: Path) -> Iterator[FaultStack]:
    private_redis = PrivateRedis()
    port_a = free_port()
    issuer = f"http://127.0.0.1:{port_a}"
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "ISSUER": issuer}
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": issuer}
    cluster = FaultStack(cluster_env(issuer=issuer, redis_url=private_redis.url), tmp_path)
    cluster.redis, cluster.forwarders = private_redis, []
    cluster.add_node("A", port_a)
    cluster.start_sealer()
    try:
        yield cluster
    finally:
        cluster.stop()
        for forwarder in cluster.forwarders:
            forwarder.close()
        private_redis.stop()


@pytest.fixture
def session_token(stack: FaultStack, flow: OAuthFlow, ledger_policy: ScopePolicy) -> str:
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


@contextmanager
def tasks_published_to(redis_url: str) -> Iterator[None]:
    """This process's Celery app publishes (on commit) to ``redis_url`` for the duration."""

    def reset_pools() -> None:
        # kombu keeps pools in a global registry keyed by connection: closing one and switching
        # back would hand out the closed pool again, so clear the registry too.
        # (Private attributes, which celery-types leave out.)
        celery_app._pool = None  # type: ignore[attr-defined]
        celery_app.amqp._producer_pool = None  # type: ignore[attr-defined]
        kombu_pools.reset()

    old = celery_app.conf.broker_url
    # The namespaced key: celery 5.6 looks up CELERY_BROKER_URL (our Django setting) before a
    # runtime ``conf.broker_url``, so only this spelling overrides it on every supported version.
    celery_app.conf["CELERY_BROKER_URL"] = redis_url
    reset_pools()
    try:
        yield
    finally:
        celery_app.conf["CELERY_BROKER_URL"] = old
        reset_pools()


def _approve_collect_redeem(
    stack: FaultStack, officer: Officer, agent: AgentHTTP, auth_req_ids: dict[str, str]
) -> None:
    """Approve each prompt over HTTP, collect each action token twice at once (exactly one wins), redeem."""
    url = stack.nodes["A"].url
    for approval_id in auth_req_ids:
        response = officer.approve(approval_id)
        assert response.status_code == 302, response.text[:500]
        assert ApprovalRequest.objects.get(pk=approval_id).status == "approved"

    def poll(auth_req_id: str) -> httpx.Response:
        with http() as client:
            return client.post(
                f"{url}/o/token/",
                auth=agent.auth,
                data={"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": auth_req_id},
            )

    tokens: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for approval_id, auth_req_id in auth_req_ids.items():
            answers = list(pool.map(poll, [auth_req_id, auth_req_id]))
            ok = [r for r in answers if r.status_code == 200]
            assert len(ok) == 1, [(r.status_code, r.text[:200]) for r in answers]
            other = next(r for r in answers if r is not ok[0])
            assert other.status_code == 400 and other.json()["error"] == "invalid_grant", other.text
            tokens[approval_id] = ok[0].json()["access_token"]
    for approval_id, token in tokens.items():
        redeemed = agent.redeem(url, token)
        assert redeemed.status_code == 200 and redeemed.json()["approval_id"] == approval_id, redeemed.text
    ids = list(auth_req_ids)
    per_approval = Counter(
        ActionToken.objects.filter(approval_id__in=[uuid.UUID(i) for i in ids]).values_list(
            "approval_id", flat=True
        )
    )
    assert {str(k): v for k, v in per_approval.items()} == dict.fromkeys(ids, 1)
    issued = Counter(
        AuditEvent.objects.filter(event="action_token.issued").values_list("detail__approval_id", flat=True)
    )
    assert issued == Counter(ids)
    assert set(ApprovalRequest.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"redeemed"}


# --- a. a Celery worker SIGKILLed while it delivers prompts --------------------------------------------


def test_worker_killed_mid_delivery_loses_no_prompt_and_mints_no_duplicate(
    stack: FaultStack,
    scenario: Scenario,
    agent: AgentHTTP,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 30
    visibility = (
        5  # CELERY_VISIBILITY_TIMEOUT (config/settings.py): the dead worker's tasks come back after it
    )
    settings.COUNTERSIGN = {
        **settings.COUNTERSIGN,
        "MAX_PENDING_PER_USER": n,  # this process creates them
        "MAX_PROMPTS_PER_USER_IN_WINDOW": n,
    }
    # The doomed worker reaches PostgreSQL over a slow link (30 ms per chunk each way), so that its
    # deliveries take long enough to kill it in the middle of them.
    _, slow_database = stack.forward_database(latency=0.03)
    a = stack.start_node("A")
    stack.start_worker("doomed", env={"DATABASE_URL": slow_database, "CELERY_VISIBILITY_TIMEOUT": visibility})
    officer = Officer(a.url, "officer", PASSWORD)
    tab = ReconnectingInbox([a.url], officer.cookie, "open-tab")
    try:
        tab.wait(lambda i: i.snapshots == 1 and not i.pending, "empty inbox", logs=stack.logs)

        # 30 step-up requests in a burst, each committed and its delivery task queued on commit.
        # This process stands in for the web node, but its channel layer is not the stack's Redis:
        # its own push after commit (approvals.services._deliver_after_commit) is made to fail, as
        # with Redis out of its reach, so every prompt is the doomed worker's to push.
        ids, auth_req_ids = [], {}
        with tasks_published_to(stack.redis.url), monkeypatch.context() as patched:
            patched.setattr(delivery, "push_now", lambda user_id, message: False)
            for i in range(n):
                req = validate_backchannel_request(
                    agent=scenario.agent,
                    params={
                        "scope": "ledger:write",
                        "login_hint_token": agent.session_token,
                        "authorization_details": json.dumps([ledger_entry(i, "KILL")]),
                    },
                )
                approval, created = approval_request_create(req=req)
                assert created
                ids.append(str(approval.pk))
                auth_req_ids[str(approval.pk)] = auth_req_id_for(approval.pk)

        tab.wait(lambda i: len(i.upserts) >= 1, "the first deliveries", logs=stack.logs)
        stack.workers["doomed"].kill(signal.SIGKILL)
        killed_at = time.monotonic()
        undelivered = ApprovalRequest.objects.filter(pk__in=ids, delivered_at__isnull=True).count()
        seen_at_kill = len(set(tab.upserts))
        assert undelivered > 0, "the worker finished every delivery before it was killed: nothing was tested"
        # What it had taken and not acknowledged (acks_late): in-flight deliveries and scheduled expiries.
        unacked = redis.Redis.from_url(stack.redis.url).hlen("unacked")
        assert unacked > 0
        print(
            f"killed the worker after {seen_at_kill} prompts reached the tab; {undelivered}/{n} undelivered, "
            f"{unacked} tasks unacknowledged"
        )

        # Replay from the database: a tab (re)opened now shows every pending approval at once,
        # including those whose delivery task died with the worker.
        reopened = ReconnectingInbox([a.url], officer.cookie, "reopened-tab")
        try:
            reopened.wait(lambda i: i.snapshots >= 1, "snapshot", logs=stack.logs)
            assert sorted(reopened.last_snapshot) == sorted(ids)
        finally:
            reopened.close()

        # A new worker: it takes the queued deliveries at once, and the dead worker's unacknowledged
        # ones once they are older than the visibility timeout (kombu restores them when a worker
        # starts polling, then every ~100 s).
        time.sleep(max(0.0, visibility + 1 - (time.monotonic() - killed_at)))
        stack.start_worker("replacement", env={"CELERY_VISIBILITY_TIMEOUT": visibility})
        # The tab that stayed open shows every prompt (live, or replayed if its websocket had to
        # reconnect meanwhile: see test_multinode.py::test_an_idle_inbox_websocket_stays_open).
        tab.wait(
            lambda i: i.seen == set(ids) and set(i.pending) == set(ids),
            "every prompt in the open tab",
            timeout=240,
            logs=stack.logs,
        )
        wait_for(
            lambda: not ApprovalRequest.objects.filter(pk__in=ids, delivered_at__isnull=True).exists(),
            "delivered_at on every approval",
            120,
            stack.logs,
        )
        delivered = Counter(
            AuditEvent.objects.filter(event="approval.delivered").values_list(
                "detail__approval_id", flat=True
            )
        )
        assert delivered == Counter(ids), "each approval is delivered exactly once in the audit trail"

        _approve_collect_redeem(stack, officer, agent, auth_req_ids)
        tab.wait(lambda i: not i.pending, "every prompt removed from the open tab", logs=stack.logs)
    finally:
        tab.close()
        officer.close()


# --- b. Redis restarted while approvals are pending and inboxes are open ---------------------------------


def _worker_after_broker_restart(stack: FaultStack, name: str) -> str:
    """Wait until the worker either reconnected to the restarted broker or exited."""
    proc = stack.workers[name]

    def settled() -> str | None:
        if not proc.alive:
            return "exited"
        if proc.tail(500_000).count("Connected to redis://") >= 2:
            return "reconnected"
        return None

    outcome = wait_for(settled, f"worker {name} reconnecting or exiting", 120, stack.logs, interval=0.2)
    assert outcome is not None  # wait_for returns what ``settled`` said once it said something
    return outcome


def _supervise(stack: FaultStack, name: str) -> str:
    """Like systemd's Restart=always (deploy/systemd/countersign-worker@.service): a worker that
    exited is started again. Returns what happened to it."""
    outcome = _worker_after_broker_restart(stack, name)
    if outcome == "exited":
        stack.start_worker(f"{name}-restarted")
    return outcome


def _redis_restart(stack: FaultStack, tabs: Iterable[ReconnectingInbox]) -> None:
    stack.redis.stop()
    # Without Redis the websockets cannot be served: the tabs lose them and keep retrying.
    for tab in tabs:
        tab.wait(lambda i: i.connected_to is None, "the tab noticing Redis is gone", logs=stack.logs)
    stack.redis.start()  # same port, empty: groups, channels and queued tasks are gone


def test_redis_restart_under_open_inboxes_loses_no_prompt(
    stack: FaultStack, scenario: Scenario, agent: AgentHTTP
) -> None:
    a = stack.start_node("A")
    stack.start_worker("w1")
    officer = Officer(a.url, "officer", PASSWORD)
    tabs = [ReconnectingInbox([a.url], officer.cookie, f"tab-{k}") for k in (1, 2)]
    try:
        for tab in tabs:
            tab.wait(lambda i: i.snapshots >= 1, "snapshot", logs=stack.logs)
        for i in range(3):
            asked = agent.ask(a.url, ledger_entry(i, "REDIS"))
            assert asked.status_code == 200, asked.text
        auth_req_ids = {
            str(pk): auth_req_id_for(pk) for pk in ApprovalRequest.objects.values_list("pk", flat=True)
        }
        before = set(auth_req_ids)
        for tab in tabs:
            tab.wait(lambda i: set(i.pending) == before, "three prompts", logs=stack.logs)
        connects = {tab.name: tab.connects for tab in tabs}

        _redis_restart(stack, tabs)
        worker = _supervise(stack, "w1")
        print(f"celery worker after the Redis restart: {worker}")

        for tab in tabs:
            tab.wait(
                lambda i: (
                    i.connects > connects[i.name]
                    and i.connected_to == a.url
                    and set(i.last_snapshot) == before
                ),
                "reconnect with every pending prompt replayed",
                timeout=120,
                logs=stack.logs,
            )

        # After the restart a new request reaches both open tabs and every approval completes.
        asked = agent.ask(a.url, ledger_entry(99, "REDIS"))
        assert asked.status_code == 200, asked.text
        new_id = str(ApprovalRequest.objects.exclude(pk__in=before).get().pk)
        auth_req_ids[new_id] = asked.json()["auth_req_id"]
        for tab in tabs:
            tab.wait(
                lambda i: new_id in i.seen and set(i.pending) == set(auth_req_ids),
                "a prompt requested after the restart",
                timeout=120,
                logs=stack.logs,
            )
        wait_for(
            lambda: ApprovalRequest.objects.filter(pk=new_id, delivered_at__isnull=False).exists(),
            "the new prompt's delivery task",
            120,
            stack.logs,
        )
        _approve_collect_redeem(stack, officer, agent, auth_req_ids)
        for tab in tabs:
            tab.wait(lambda i: not i.pending, "removals after the decisions", timeout=120, logs=stack.logs)
    finally:
        for tab in tabs:
            tab.close()
        officer.close()


def test_celery_worker_survives_a_redis_restart(
    stack: FaultStack, scenario: Scenario, agent: AgentHTTP
) -> None:
    a = stack.start_node("A")
    stack.start_worker("w1")
    assert agent.ask(a.url, ledger_entry(1, "SURVIVE")).status_code == 200
    wait_for(
        lambda: ApprovalRequest.objects.filter(delivered_at__isnull=False).exists(),
        "delivery",
        60,
        stack.logs,
    )
    stack.redis.stop()
    wait_for(
        lambda: (
            "Connection to broker lost" in stack.workers["w1"].tail(500_000) or not stack.workers["w1"].alive
        ),
        "the worker noticing",
        60,
        stack.logs,
    )
    stack.redis.start()
    assert _worker_after_broker_restart(stack, "w1") == "reconnected", stack.workers["w1"].tail(3000)

    # Reconnected is not enough: the same worker (no supervisor restarted it) delivers new work.
    before = set(ApprovalRequest.objects.values_list("pk", flat=True))
    assert agent.ask(a.url, ledger_entry(2, "SURVIVE")).status_code == 200
    new = ApprovalRequest.objects.exclude(pk__in=before).get()
    wait_for(
        lambda: ApprovalRequest.objects.filter(pk=new.pk, delivered_at__isnull=False).exists(),
        "delivery after the restart",
        120,
        stack.logs,
    )
    assert stack.workers["w1"].alive, stack.workers["w1"].tail(3000)


def test_requests_during_a_redis_outage_are_answered_and_the_prompt_arrives_after_it(
    stack: FaultStack, scenario: Scenario, agent: AgentHTTP
) -> None:
    a = stack.start_node("A")
    stack.start_worker("w1")
    officer = Officer(a.url, "officer", PASSWORD)
    tab = ReconnectingInbox([a.url], officer.cookie, "tab")
    try:
        first = agent.ask(a.url, ledger_entry(1, "OUTAGE"))
        assert first.status_code == 200, first.text
        first_id = str(ApprovalRequest.objects.get().pk)
        tab.wait(lambda i: first_id in i.pending, "the first prompt", logs=stack.logs)
        stack.redis.stop()
        tab.wait(lambda i: i.connected_to is None, "the tab noticing Redis is gone", logs=stack.logs)

        # PostgreSQL is up: the decision and the new request are recorded; the news follows later.
        decided = officer.approve(first_id)
        during = agent.ask(a.url, ledger_entry(2, "OUTAGE"))
        stack.redis.start()
        _supervise(stack, "w1")
        assert decided.status_code == 302, decided.status_code
        assert during.status_code == 200, (
            during.status_code,
            during.text[:300],
            list(ApprovalRequest.objects.values_list("headline", "status")),
        )
        second_id = str(ApprovalRequest.objects.exclude(pk=first_id).get().pk)
        # The reconnecting tab replays it from the database at once...
        tab.wait(
            lambda i: set(i.pending) == {second_id},
            "the prompt after the outage",
            timeout=120,
            logs=stack.logs,
        )
        # ...and the beat's redelivery sweep queues the delivery task that was lost with the broker.
        stack.start_beat()
        wait_for(
            lambda: ApprovalRequest.objects.filter(pk=second_id, delivered_at__isnull=False).exists(),
            "the prompt's delivery task (redelivery sweep)",
            150,
            stack.logs,
        )
    finally:
        tab.close()
        officer.close()


# --- c. PostgreSQL unreachable --------------------------------------------------------------------------


def _readyz(url: str) -> httpx.Response:
    with http() as client:
        return client.get(f"{url}/readyz")


def _wait_ready(stack: FaultStack, url: str) -> None:
    def ready() -> bool:
        try:
            return _readyz(url).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, "/readyz 200 again", 120, stack.logs, interval=0.5)


def _approval_for(purchase_order: str) -> ApprovalRequest | None:
    return ApprovalRequest.objects.filter(authorization_details__0__purchase_order=purchase_order).first()


def test_database_unreachable_answers_503_and_writes_nothing_half(
    stack: FaultStack, scenario: Scenario, agent: AgentHTTP
) -> None:
    link, database = stack.forward_database()
    a = stack.start_node("A", env={"DATABASE_URL": database})
    stack.start_worker("w1")
    officer = Officer(a.url, "officer", PASSWORD)
    try:
        before = agent.ask(a.url, ledger_entry(1, "PG"))
        assert before.status_code == 200, before.text
        assert _readyz(a.url).status_code == 200

        link.cut()

        token = agent.poll(a.url, before.json()["auth_req_id"])
        assert token.status_code == 503, token.text
        assert token.json()["error"] == "temporarily_unavailable" and token.headers["Retry-After"]
        during = agent.ask(a.url, ledger_entry(2, "PG"))
        assert during.status_code == 503, during.text
        assert during.json()["error"] == "temporarily_unavailable"
        ready = _readyz(a.url)
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["database"]["status"] == "down", checks
        assert checks["channel_layer"]["status"] == "ok" and checks["broker"]["status"] == "ok", checks
        assert link.refused > 0  # the node really tried to reach the database

        link.restore()
        _wait_ready(stack, a.url)
        after = agent.ask(a.url, ledger_entry(3, "PG"))
        assert after.status_code == 200, after.text
        pending = agent.poll(a.url, before.json()["auth_req_id"])
        assert pending.status_code == 400 and pending.json()["error"] in (
            "authorization_pending",
            "slow_down",
        )

        # Nothing half-written: the request made during the outage left no trace but its refusal.
        assert _approval_for("PO-PG-0002") is None
        assert not AuditEvent.objects.filter(
            event="approval.requested", detail__headline__contains="PO-PG-0002"
        ).exists()
        assert _approval_for("PO-PG-0001") is not None and _approval_for("PO-PG-0003") is not None
        collected: dict[str, str] = {}
        for po, asked in (("PO-PG-0001", before), ("PO-PG-0003", after)):
            approval = _approval_for(po)
            assert approval is not None
            collected[str(approval.pk)] = asked.json()["auth_req_id"]
        _approve_collect_redeem(stack, officer, agent, collected)
    finally:
        officer.close()


def test_database_unreachable_user_pages_answer_a_plain_503(
    stack: FaultStack, scenario: Scenario, agent: AgentHTTP
) -> None:
    link, database = stack.forward_database()
    a = stack.start_node("A", env={"DATABASE_URL": database})
    officer = Officer(a.url, "officer", PASSWORD)  # signed in: its session lives in the database
    try:
        link.cut()
        page = officer.http.get(f"{a.url}/approvals/")
        link.restore()
        assert page.status_code == 503, (page.status_code, page.text[:300], stack.logs())
        assert page.headers["Content-Type"].startswith("text/html")
        assert "briefly unavailable" in page.text and "Traceback" not in page.text
        _wait_ready(stack, a.url)
        assert officer.http.get(f"{a.url}/approvals/").status_code == 200
    finally:
        officer.close()


def test_database_lost_in_the_middle_of_a_request_leaves_no_half_written_approval(
    stack: FaultStack, scenario: Scenario, agent: AgentHTTP
) -> None:
    """The link drops at the first audit write of a step-up request (after the approval row)."""
    link, database = stack.forward_database()
    a = stack.start_node("A", env={"DATABASE_URL": database})
    stack.start_worker("w1")
    assert agent.ask(a.url, ledger_entry(1, "MID")).status_code == 200  # warm: pool, keys, caches
    link.cut_on(b'INSERT INTO "audit_auditevent"')
    cut = agent.ask(a.url, ledger_entry(2, "MID"))
    assert link.triggered.is_set(), "the request never reached its audit write"
    assert cut.status_code == 503, cut.text
    link.restore()
    _wait_ready(stack, a.url)
    approval = _approval_for("PO-MID-0002")
    audited = (
        AuditEvent.objects.filter(event="approval.requested", detail__approval_id=str(approval.pk)).exists()
        if approval
        else False
    )
    # All or nothing: either no approval, or the approval with its audit event.
    assert approval is None or audited, (
        f"approval {approval.pk} ({approval.status}) exists without its approval.requested audit event, "
        "after the agent was told 503"
    )

"""Health, readiness, metrics and the production configuration."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from channels.layers import channel_layers
from django.test import Client
from kombu import pools as kombu_pools
from pytest_django import Settings

from config.celery import app as celery_app
from tests.conftest import OAuthFlow

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


def test_healthz_answers_without_touching_dependencies(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_each_dependency(client: Client) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ok"
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "database": "ok",
        "channel_layer": "ok",
        "broker": "ok",
        "audit_sealer": "ok",
    }


@pytest.fixture
def doomed_redis(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """A Redis of our own that the test can stop, with the app's channel layer and broker on it."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is needed for this test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [url]}}
    }
    channel_layers.backends.clear()
    old_broker = celery_app.conf.broker_url
    _point_celery_at(url)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        _point_celery_at(old_broker)
        channel_layers.backends.clear()


def _point_celery_at(broker_url: str) -> None:
    """Switch the app's broker, dropping (not closing for good) its connection pools."""
    # The namespaced key: celery 5.6 looks up CELERY_BROKER_URL (our Django setting) before a
    # runtime ``conf.broker_url``, so only this spelling overrides it on every supported version.
    celery_app.conf["CELERY_BROKER_URL"] = broker_url
    # kombu keeps pools in a global registry keyed by connection: clear it, or switching back would
    # hand out a closed pool.
    # (Private attributes, which celery-types leave out.)
    celery_app._pool = None  # type: ignore[attr-defined]
    celery_app.amqp._producer_pool = None  # type: ignore[attr-defined]
    kombu_pools.reset()


def test_readyz_is_503_naming_redis_when_it_stops(
    client: Client, doomed_redis: subprocess.Popen[bytes]
) -> None:
    assert client.get("/readyz").status_code == 200
    doomed_redis.terminate()
    doomed_redis.wait()
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"]["status"] == "ok"
    assert checks["channel_layer"]["status"] == "down" and checks["broker"]["status"] == "down"


def test_metrics_in_prometheus_format_for_loopback_or_token_only(
    client: Client, flow: OAuthFlow, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow.full()
    body = client.get("/metrics", REMOTE_ADDR="127.0.0.1").content.decode()
    assert 'countersign_tokens_minted_total{kind="session"} 1.0' in body
    assert "countersign_pending_approvals 0.0" in body and "countersign_websocket_connections" in body
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 403
    monkeypatch.setenv("METRICS_TOKEN", "s3cret-scrape-token")
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape-token").status_code == 200


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": "sqlite:////tmp/countersign-deploy-check.sqlite3", **env},
        timeout=120,
    )


def test_production_settings_pass_check_deploy() -> None:
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        COUNTERSIGN_ISSUER="https://auth.example.com",
        SECRET_KEY=secrets.token_urlsafe(60),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_refuses_to_start_without_a_secret_key() -> None:
    env = {"COUNTERSIGN_ISSUER": "https://auth.example.com", "SECRET_KEY": ""}
    result = _manage("check", **env)
    assert result.returncode != 0 and "SECRET_KEY must be set" in result.stderr


def test_json_logs_carry_request_user_agent_and_grant_ids_but_no_token(
    flow: OAuthFlow, caplog: pytest.LogCaptureFixture
) -> None:
    import json as _json
    import logging

    from config.logging import JsonFormatter

    caplog.set_level(logging.WARNING, logger="django.request")
    body = flow.full()
    response = flow.client.post(
        "/o/introspect/",
        "token=" + body["access_token"],
        content_type="application/x-www-form-urlencoded",
        HTTP_X_REQUEST_ID="req-12345678",
    )
    assert response.status_code == 401 and response["X-Request-ID"] == "req-12345678"
    record = next(r for r in caplog.records if r.name == "django.request")
    line = _json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-12345678" and line["level"] == "WARNING"
    assert body["access_token"] not in JsonFormatter().format(record)

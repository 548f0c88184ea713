"""The demo's configuration: the JSON object ``manage.py seed_demo --json`` prints.

.. code-block:: json

    {"issuer": "http://127.0.0.1:8000",
     "users": [{"username": "officer", "password": "..."}],
     "agents": [{"name": "...", "client_id": "...", "client_secret": "...",
                 "redirect_uris": ["http://127.0.0.1:8199/callback"], "scopes": ["..."]}],
     "resource_servers": [{"name": "...", "audience": "http://127.0.0.1:8101",
                           "client_id": "...", "client_secret": "..."}],
     "scopes": [{"name": "catalog:read", "sensitivity": "standard", "audience": "http://127.0.0.1:8101"}]}

Each of the five systems is found by its scope: the system for ``catalog:read`` is the
resource server whose audience is that scope's audience. The audience is also the base URL
where the system listens, so it must be a loopback ``http://127.0.0.1:PORT`` URL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# (key, scope, title) in the order the agent uses them.
SYSTEMS: list[tuple[str, str, str]] = [
    ("catalog", "catalog:read", "Vendor catalog"),
    ("budget", "budget:read", "Budget"),
    ("drafting", "po:draft", "Procurement drafting"),
    ("routing", "approval:route", "Approval routing"),
    ("ledger", "ledger:write", "Financial ledger"),
]


class ConfigError(ValueError):
    """The credentials file is missing something the demo needs."""


@dataclass(frozen=True)
class SystemConfig:
    key: str
    scope: str
    title: str
    audience: str  # also the base URL, e.g. http://127.0.0.1:8101
    client_id: str
    client_secret: str
    sensitivity: str

    @property
    def host(self) -> str:
        return urlsplit(self.audience).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        port = urlsplit(self.audience).port
        if port is None:
            raise ConfigError(f"the audience of {self.scope} ({self.audience}) names no port")
        return port

    def url(self, path: str) -> str:
        return self.audience.rstrip("/") + path


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def load(path: str | Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: no such file (make it with: manage.py seed_demo --json > {path})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("issuer"), str):
        raise ConfigError(f"{path}: not the output of seed_demo --json (no issuer)")
    return config


def systems(config: dict[str, Any]) -> dict[str, SystemConfig]:
    """The five systems, keyed catalog/budget/drafting/routing/ledger."""
    scopes = {s.get("name"): s for s in config.get("scopes", []) if isinstance(s, dict)}
    servers = {s.get("audience"): s for s in config.get("resource_servers", []) if isinstance(s, dict)}
    found: dict[str, SystemConfig] = {}
    for key, scope, title in SYSTEMS:
        policy = scopes.get(scope)
        if policy is None:
            raise ConfigError(f"the configuration has no scope {scope}")
        audience = policy.get("audience")
        server = servers.get(audience)
        if server is None or not isinstance(audience, str):
            raise ConfigError(f"no resource server with the audience of {scope} ({audience})")
        if not is_loopback(audience) or urlsplit(audience).scheme != "http":
            raise ConfigError(f"{scope}: the demo serves loopback http:// audiences only, not {audience}")
        if not server.get("client_secret"):
            raise ConfigError(
                f"{server.get('name')}: no secret in the configuration (seed_demo shows a secret "
                f"only when it issues one; make a fresh file with seed_demo --rotate-secrets --json)"
            )
        found[key] = SystemConfig(
            key=key,
            scope=scope,
            title=title,
            audience=audience,
            client_id=server["client_id"],
            client_secret=server["client_secret"],
            sensitivity=str(policy.get("sensitivity") or "standard"),
        )
    ports = [s.port for s in found.values()]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"two systems share a port: {ports}")
    return found


def agent(config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    agents = [a for a in config.get("agents", []) if isinstance(a, dict)]
    if name:
        agents = [a for a in agents if a.get("name") == name]
    if not agents:
        raise ConfigError(f"the configuration has no agent{' named ' + name if name else ''}")
    chosen = agents[0]
    if not chosen.get("redirect_uris"):
        raise ConfigError(f"agent {chosen.get('name')} has no redirect URI")
    if not chosen.get("client_secret"):
        raise ConfigError(
            f"agent {chosen.get('name')}: no secret in the configuration (seed_demo shows a secret "
            f"only when it issues one; make a fresh file with seed_demo --rotate-secrets --json)"
        )
    return chosen

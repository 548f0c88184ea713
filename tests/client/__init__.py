"""Helpers for the client-package tests.

``LocalIssuer`` is an authorization server in miniature behind an
``httpx.MockTransport``: metadata, a JWKS, the agent registry and a redemption
endpoint, each request counted. It signs tokens with keys the test holds, so the
forged-token cases (alg none, HS256 with our public key, a foreign issuer...) are
tokens an attacker could actually make.

``consent_over_http`` plays the signed-in officer on the live server's consent
screen.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from countersign.dpop import jwk_thumbprint
from tests.live import LiveStack

if TYPE_CHECKING:
    from django.contrib.auth.models import User

ISSUER = "https://auth.example"
AUDIENCE = "https://catalog.example"
RS_ID, RS_SECRET = "rs-catalog", "rs-secret-123"
AGENT_ID = "agent-procure"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    def __init__(self, alg: str = "ES256", kid: str | None = None) -> None:
        self.alg = alg
        self.private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if alg == "ES256":
            ec_key = ec.generate_private_key(ec.SECP256R1())
            public = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
            self.private = ec_key
        else:
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            public = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
            self.private = rsa_key
        self.kid = kid or jwk_thumbprint(public)
        self.jwk = {**public, "kid": self.kid, "alg": alg, "use": "sig"}
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class LocalIssuer:
    """An issuer behind ``httpx.MockTransport``, with a registry and a redemption endpoint."""

    def __init__(self, alg: str = "ES256") -> None:
        self.key = SigningKey(alg)
        self.keys = [self.key]
        self.agents: dict[str, dict[str, Any]] = {
            AGENT_ID: {
                "client_id": AGENT_ID,
                "actor": f"agent:{AGENT_ID}",
                "name": "Procurement Agent",
                "publisher": "Acme Agents",
                "status": "active",
                "jkt": [],
            },
        }
        self.calls: Counter[str] = Counter()
        self.redeemed: set[str] = set()
        self.metadata_issuer = ISSUER
        self.registry_down = False
        self.requested_urls: list[str] = []
        self.transport = httpx.MockTransport(self._handle)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=self.transport, base_url=ISSUER)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.requested_urls.append(url)
        path = request.url.path
        if not url.startswith(ISSUER + "/"):
            self.calls["foreign"] += 1
            return httpx.Response(599)
        if path == "/.well-known/oauth-authorization-server":
            self.calls["metadata"] += 1
            return httpx.Response(
                200,
                json={
                    "issuer": self.metadata_issuer,
                    "jwks_uri": f"{ISSUER}/.well-known/jwks.json",
                    "token_endpoint": f"{ISSUER}/o/token/",
                    "redemption_endpoint": f"{ISSUER}/o/redeem/",
                    "agent_registry_endpoint": f"{ISSUER}/o/agents/",
                },
            )
        if path == "/.well-known/jwks.json":
            self.calls["jwks"] += 1
            return httpx.Response(200, json={"keys": [k.jwk for k in self.keys]})
        expected_auth = "Basic " + base64.b64encode(f"{RS_ID}:{RS_SECRET}".encode()).decode()
        if path.startswith("/o/agents/"):
            self.calls["registry"] += 1
            if self.registry_down:
                return httpx.Response(502)
            if request.headers.get("Authorization") != expected_auth:
                return httpx.Response(401, json={"error": "invalid_client"})
            agent = self.agents.get(path.removeprefix("/o/agents/"))
            return (
                httpx.Response(200, json=agent) if agent else httpx.Response(404, json={"error": "not_found"})
            )
        if path == "/o/redeem/":
            self.calls["redeem"] += 1
            if request.headers.get("Authorization") != expected_auth:
                return httpx.Response(401, json={"error": "invalid_client"})
            form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
            jti = jwt.decode(form["token"], options={"verify_signature": False})["jti"]
            if jti in self.redeemed:
                return httpx.Response(
                    400, json={"error": "invalid_token", "error_description": "action token already redeemed"}
                )
            self.redeemed.add(jti)
            return httpx.Response(200, json={"redeemed": True})
        return httpx.Response(404, json={"error": "not_found"})

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "user:7",
            "aud": [AUDIENCE],
            "client_id": AGENT_ID,
            "scope": "catalog:read budget:read",
            "act": {"sub": f"agent:{AGENT_ID}"},
            "grant_id": "g-1",
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + 900,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        *,
        typ: str | None = "at+jwt",
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        key = key or self.key
        header = {"kid": key.kid, **({"typ": typ} if typ else {}), **(headers or {})}
        return jwt.encode(self.claims(**overrides), key.private, algorithm=key.alg, headers=header)

    def action(self, details: list[dict[str, Any]], **overrides: Any) -> str:
        from countersign.verifier import action_hash

        overrides.setdefault("authorization_details", details)
        overrides.setdefault("action_hash", action_hash(details))
        overrides.setdefault("scope", "ledger:write")
        overrides.setdefault("approval_id", "a-1")
        overrides.setdefault("exp", int(time.time()) + 120)
        return self.mint(typ="action+jwt", **overrides)


def hs256_with_public_key(claims: dict[str, Any], key: SigningKey, typ: str = "at+jwt") -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the published public key."""
    header = b64(json.dumps({"alg": "HS256", "typ": typ, "kid": key.kid}).encode())
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(key.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def raw_es256(header: dict[str, Any], claims: dict[str, Any], key: SigningKey) -> str:
    """An ES256 JWS with any header at all (PyJWT refuses, e.g., a non-string kid)."""
    assert isinstance(key.private, ec.EllipticCurvePrivateKey), "raw_es256 signs with an ES256 key"
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), key.private)
    return f"{signing_input}.{b64(signature)}"


def unsigned(claims: dict[str, Any], kid: str, typ: str = "at+jwt") -> str:
    header = b64(json.dumps({"alg": "none", "typ": typ, "kid": kid}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


# --- the live server ------------------------------------------------------------------------------


def consent_over_http(live: LiveStack, user: User, url: str, state: str, *, decision: str = "allow") -> str:
    """The officer, signed in, answers the live server's consent screen in a browser-like way
    (session cookie, CSRF token, the form's own fields). Returns the authorization code."""
    from django.test import Client

    browser = Client()
    browser.force_login(user)
    with httpx.Client(
        base_url=live.url, cookies={"sessionid": browser.cookies["sessionid"].value}, timeout=10
    ) as http:
        page = http.get(url)
        assert page.status_code == 200, page.text[:500]
        fields = dict(re.findall(r'name="(csrfmiddlewaretoken|authz_query)" value="([^"]*)"', page.text))
        lifetime = re.search(r'<option value="(\d+)"', page.text)
        response = http.post(
            "/o/authorize/",
            headers={"Origin": live.url, "Referer": url},
            data={
                "csrfmiddlewaretoken": html.unescape(fields["csrfmiddlewaretoken"]),
                "authz_query": html.unescape(fields["authz_query"]),
                "decision": decision,
                "lifetime": lifetime.group(1) if lifetime else "3600",
            },
        )
    assert response.status_code == 302, response.text[:500]
    params = parse_qs(urlparse(response.headers["Location"]).query)
    assert params["state"] == [state]
    return params["code"][0]


@contextmanager
def officer_decides(user: User, *, decision: str = "approve") -> Iterator[None]:
    """While the block runs, the officer answers the first pending prompt in the browser
    (Django's test client, so CSRF, login and ownership checks all apply)."""
    from django.db import connection
    from django.test import Client

    from approvals.models import ApprovalRequest

    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                pending = ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING).first()
                if pending is not None:
                    officer = Client()
                    officer.force_login(user)
                    assert officer.post(f"/approvals/{pending.pk}/{decision}/").status_code == 302
                    return
                stop.wait(0.05)
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)

"""RFC 9728 protected resource metadata from the countersign package: served by the ASGI middleware and the
Django integration at both well-known paths, named by every challenge (§5.1)."""

import asyncio
import json
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import pytest
from django.test import RequestFactory

from countersign import TokenVerifier
from countersign.asgi import CountersignMiddleware, Message, Receive, Scope, Send
from countersign.resource_metadata import metadata_paths, metadata_url
from tests.client import ISSUER, RS_ID, RS_SECRET, LocalIssuer

MCP = "http://127.0.0.1:8765/mcp"


def test_metadata_url_puts_the_well_known_segment_before_the_path() -> None:
    assert metadata_url(MCP) == "http://127.0.0.1:8765/.well-known/oauth-protected-resource/mcp"
    assert metadata_url("https://api.example/") == "https://api.example/.well-known/oauth-protected-resource"
    assert metadata_paths(MCP) == (
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    )


@pytest.fixture
def mcp_verifier() -> TokenVerifier:
    return TokenVerifier(
        ISSUER,
        client_id=RS_ID,
        client_secret=RS_SECRET,
        audience=MCP,
        http=LocalIssuer().client(),
        scopes_supported=["catalog:read"],
        resource_name="Shop",
    )


def _call(
    app: Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]],
    path: str,
    method: str = "GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    scope: Scope = {
        "type": "http",
        "method": method,
        "scheme": "http",
        "path": path,
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8765"), *headers],
        "server": ("127.0.0.1", 8765),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"])


def test_asgi_middleware_serves_the_metadata_and_names_it_in_every_challenge(
    mcp_verifier: TokenVerifier,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # never reached without a token
        raise AssertionError("the protected app ran")

    protected = CountersignMiddleware(app, mcp_verifier, required_scopes=["catalog:read"])
    for path in metadata_paths(MCP):
        status, headers, body = _call(protected, path)
        assert status == 200
        assert body == {
            "resource": MCP,
            "authorization_servers": [ISSUER],
            "bearer_methods_supported": ["header"],
            "scopes_supported": ["catalog:read"],
            "resource_name": "Shop",
            "dpop_signing_alg_values_supported": list(mcp_verifier.dpop_algorithms),
        }
    assert _call(protected, metadata_paths(MCP)[0], method="POST")[0] == 405
    status, headers, body = _call(protected, "/mcp", method="POST")
    assert status == 401
    assert headers[b"www-authenticate"].decode() == (
        f'Bearer realm="countersign", resource_metadata="{metadata_url(MCP)}"'
    )
    status, headers, body = _call(
        protected, "/mcp", method="POST", headers=[(b"authorization", b"Bearer x.y.z")]
    )
    assert status == 401 and body["error"] == "invalid_token"
    assert f'resource_metadata="{metadata_url(MCP)}"' in headers[b"www-authenticate"].decode()


def test_a_token_lacking_the_scope_gets_403_insufficient_scope_naming_it(mcp_verifier: TokenVerifier) -> None:
    issuer = LocalIssuer()
    verifier = TokenVerifier(
        ISSUER, client_id=RS_ID, client_secret=RS_SECRET, audience=MCP, http=issuer.client()
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the protected app ran")

    protected = CountersignMiddleware(app, verifier, required_scopes=["catalog:read"])
    token = issuer.mint(scope="budget:read", aud=MCP)
    status, headers, body = _call(
        protected, "/mcp", method="POST", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    assert status == 403 and body["error"] == "insufficient_scope"
    challenge = headers[b"www-authenticate"].decode()
    assert 'error="insufficient_scope"' in challenge and 'scope="catalog:read"' in challenge
    assert f'resource_metadata="{metadata_url(MCP)}"' in challenge


def test_a_token_for_another_resource_is_refused() -> None:
    issuer = LocalIssuer()
    verifier = TokenVerifier(
        ISSUER, client_id=RS_ID, client_secret=RS_SECRET, audience=MCP, http=issuer.client()
    )
    from countersign import InvalidToken

    with pytest.raises(InvalidToken, match="not for this resource server"):
        verifier.verify_session(issuer.mint(aud="http://127.0.0.1:9999/mcp"))


def test_django_integration_serves_the_metadata(mcp_verifier: TokenVerifier, rf: RequestFactory) -> None:
    from countersign.django import metadata_urlpatterns

    patterns = metadata_urlpatterns(mcp_verifier)
    assert [str(p.pattern) for p in patterns] == [p.lstrip("/") for p in metadata_paths(MCP)]
    response = patterns[0].callback(rf.get(metadata_paths(MCP)[0]))
    assert response.status_code == 200 and json.loads(response.content)["resource"] == MCP

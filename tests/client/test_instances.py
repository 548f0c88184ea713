"""The countersign package and agent instances: the SDK runs as an instance (its key attested by
the agent's registered key), the verifier names the instance and refuses a cut-off one, as it
refuses a suspended agent."""

from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from django.test import Client

from consent.instances import agent_instance_cut_off
from consent.models import AgentInstance
from countersign import AgentClient, InstanceCutOff, InvalidDPoPProof, TokenVerifier
from countersign import AgentInstance as SdkInstance
from countersign.dpop import DPoPKey
from tests.conftest import REDIRECT_URI, OAuthFlow, Scenario
from tests.consent.test_token_exchange import AgentKey

ISSUER = "http://127.0.0.1:8000"


def through_django(client: Client) -> httpx.Client:
    """An httpx client whose requests the Django test client serves (same process, same database)."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        meta: dict[str, Any] = {
            f"HTTP_{k.upper().replace('-', '_')}": v
            for k, v in request.headers.items()
            if k.lower() not in ("content-type", "content-length", "host")
        }
        if request.method == "GET":
            answer = client.get(path, **meta)
        else:
            answer = client.generic(
                request.method,
                path,
                request.content,
                content_type=request.headers.get("content-type", ""),
                **meta,
            )
        return httpx.Response(answer.status_code, headers=dict(answer.items()), content=answer.content)

    return httpx.Client(transport=httpx.MockTransport(handle))


@pytest.fixture
def agent_key(scenario: Scenario) -> AgentKey:
    key = AgentKey()
    scenario.agent.jwks = {"keys": [key.jwk]}
    scenario.agent.save()
    return key


def run_as_instance(
    client: Client, flow: OAuthFlow, scenario: Scenario, agent_key: AgentKey, name: str, *, dpop: bool = False
) -> AgentClient:
    """An SDK client running as one instance: it consents through the browser flow and exchanges the code."""
    instance = SdkInstance.generate(
        scenario.agent.client_id, agent_key=agent_key.private, key_id=agent_key.kid, instance=name
    )
    sdk = AgentClient(
        ISSUER,
        scenario.agent.client_id,
        redirect_uri=REDIRECT_URI,
        http=through_django(client),
        instance=instance,
        dpop_key=instance.key if dpop else None,
    )
    url, state, verifier = sdk.authorization_url("catalog:read budget:read")
    flow.login()
    query = urlsplit(url).query.replace(f"state={state}", "state=st-123")
    code = flow.code_from(flow.consent(query))
    sdk.exchange_code(code, verifier)
    return sdk


def verifier_for(client: Client, scenario: Scenario) -> TokenVerifier:
    return TokenVerifier(
        ISSUER,
        client_id=scenario.rs_client_id,
        client_secret=scenario.rs_secret,
        audience=scenario.rs_audience,
        http=through_django(client),
    )


def test_the_sdk_runs_as_an_instance_and_the_verifier_names_it(
    client: Client, flow: OAuthFlow, scenario: Scenario, agent_key: AgentKey
) -> None:
    sdk = run_as_instance(client, flow, scenario, agent_key, "7e1f00aa")
    assert sdk.tokens is not None and sdk.instance is not None
    verified = verifier_for(client, scenario).verify_session(
        sdk.tokens.access_token, required_scopes=["catalog:read"]
    )
    assert verified.instance == "7e1f00aa" and verified.actor == f"agent:{scenario.agent.client_id}"
    assert sdk.remint().access_token != verified.claims["jti"]  # a refresh, as the instance
    assert AgentInstance.objects.get().instance_id == "7e1f00aa"


def test_the_verifier_refuses_a_cut_off_instance(
    client: Client, flow: OAuthFlow, scenario: Scenario, agent_key: AgentKey
) -> None:
    sdk = run_as_instance(client, flow, scenario, agent_key, "7e1f00aa")
    assert sdk.tokens is not None and sdk.instance is not None
    verifier = verifier_for(client, scenario)
    token = sdk.tokens.access_token
    verifier.verify_session(token)
    agent_instance_cut_off(instance_pk=AgentInstance.objects.get().pk, by="admin:root")
    verifier.forget_agent(scenario.agent.client_id)  # else refused after registry_ttl
    with pytest.raises(InstanceCutOff, match="cut off"):
        verifier.verify_session(token)


def test_a_dpop_bound_instance_token_needs_the_instance_key(
    client: Client, flow: OAuthFlow, scenario: Scenario, agent_key: AgentKey
) -> None:
    sdk = run_as_instance(client, flow, scenario, agent_key, "7e1f00aa", dpop=True)
    assert sdk.tokens is not None and sdk.instance is not None
    verifier = verifier_for(client, scenario)
    token = sdk.tokens.access_token
    url = "http://catalog.test/items"
    verified = verifier.verify_session(
        token,
        dpop_proof=sdk.instance.key.proof("GET", url, access_token=token),
        htm="GET",
        htu=url,
        scheme="DPoP",
    )
    assert verified.dpop_jkt == sdk.instance.key.jkt and verified.instance == "7e1f00aa"
    with pytest.raises(InvalidDPoPProof):
        verifier.verify_session(
            token,
            dpop_proof=DPoPKey.generate().proof("GET", url, access_token=token),
            htm="GET",
            htu=url,
            scheme="DPoP",
        )


def test_a_single_instance_agent_is_unchanged_for_the_verifier(
    client: Client, flow: OAuthFlow, scenario: Scenario
) -> None:
    token = flow.full(scope="catalog:read budget:read")["access_token"]
    verified = verifier_for(client, scenario).verify_session(token)
    assert verified.instance is None and verified.claims["act"] == {
        "sub": f"agent:{scenario.agent.client_id}"
    }

"""Agent instances at the token endpoint: attestation-based client authentication
(draft-ietf-oauth-attestation-based-client-auth), ``act.instance``, and cutting one instance off."""

import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from django.contrib.auth.models import User
from django.test import Client
from pytest_django import DjangoAssertNumQueries

from audit.models import AuditEvent
from consent.instances import agent_instance_cut_off
from consent.models import Agent, AgentInstance, SessionGrant
from countersign.dpop import DPoPKey
from countersign.instance import ATTESTATION_TYP, POP_TYP, issue_attestation
from countersign.instance import AgentInstance as SdkInstance
from tests.conftest import REDIRECT_URI, ClientResponse, OAuthFlow, Scenario, pkce_pair
from tests.consent.test_token_exchange import ACCESS, EXCHANGE, AgentKey

ISSUER = "http://127.0.0.1:8000"


def headers(inst: SdkInstance, *, attestation: str | None = None, pop: str | None = None) -> dict[str, Any]:
    return {
        "HTTP_OAUTH_CLIENT_ATTESTATION": attestation if attestation is not None else inst.attestation(),
        "HTTP_OAUTH_CLIENT_ATTESTATION_POP": pop if pop is not None else inst.pop(ISSUER),
    }


def post_token(
    client: Client, data: dict[str, str], inst: SdkInstance | None = None, **extra: Any
) -> ClientResponse:
    sent = {
        **(headers(inst) if inst is not None and "HTTP_OAUTH_CLIENT_ATTESTATION" not in extra else {}),
        **extra,
    }
    return client.post("/o/token/", urlencode(data), content_type="application/x-www-form-urlencoded", **sent)


def join(client: Client, inst: SdkInstance, subject: str, **extra: Any) -> ClientResponse:
    """The instance takes the agent's token into a token of its own (RFC 8693 §2.1)."""
    return post_token(
        client,
        {"grant_type": EXCHANGE, "subject_token": subject, "subject_token_type": ACCESS},
        inst,
        **extra,
    )


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


@pytest.fixture
def agent_key(scenario: Scenario) -> AgentKey:
    key = AgentKey()
    scenario.agent.jwks = {"keys": [key.jwk]}
    scenario.agent.save()
    return key


def instance(scenario: Scenario, agent_key: AgentKey, name: str) -> SdkInstance:
    return SdkInstance.generate(
        scenario.agent.client_id, agent_key=agent_key.private, key_id=agent_key.kid, instance=name
    )


@pytest.fixture
def two(scenario: Scenario, agent_key: AgentKey) -> tuple[SdkInstance, SdkInstance]:
    return instance(scenario, agent_key, "3f9c2a7b"), instance(scenario, agent_key, "b81d04e6")


@pytest.fixture
def agents_token(flow: OAuthFlow) -> str:
    """The agent's own session token (the agent as one, client secret), the user signed out again."""
    token: str = flow.full()["access_token"]
    flow.client.logout()
    return token


def refusals(event: str = "agent_instance.refused") -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event=event).order_by("id"))


def test_two_instances_on_one_grant_get_distinct_act_instance(
    client: Client, scenario: Scenario, two: tuple[SdkInstance, SdkInstance], agents_token: str
) -> None:
    a, b = two
    token_a = join(client, a, agents_token)
    token_b = join(client, b, agents_token)
    assert token_a.status_code == 200 and token_b.status_code == 200, (token_a.content, token_b.content)
    act_a, act_b = (
        claims(token_a.json()["access_token"])["act"],
        claims(token_b.json()["access_token"])["act"],
    )
    agent = f"agent:{scenario.agent.client_id}"
    assert act_a == {"sub": agent, "instance": "3f9c2a7b"} and act_b == {"sub": agent, "instance": "b81d04e6"}
    assert claims(agents_token)["act"] == {"sub": agent}  # the agent as one: unchanged
    grant = SessionGrant.objects.get()
    rows = AgentInstance.objects.filter(grant=grant).order_by("instance_id")
    assert [(r.instance_id, r.status, r.jkt) for r in rows] == [
        ("3f9c2a7b", "active", a.key.jkt),
        ("b81d04e6", "active", b.key.jkt),
    ]
    created = AuditEvent.objects.filter(event="agent_instance.created").order_by("id")
    assert [e.detail["instance"] for e in created] == ["3f9c2a7b", "b81d04e6"]
    exchanged = AuditEvent.objects.filter(event="token.exchanged").order_by("id")
    assert [e.detail["instance"] for e in exchanged] == ["3f9c2a7b", "b81d04e6"]


def test_an_instance_re_mints_only_its_own_tokens(
    client: Client, scenario: Scenario, two: tuple[SdkInstance, SdkInstance], agents_token: str
) -> None:
    scenario.agent.refresh_mode = Agent.RefreshMode.EXCHANGE
    scenario.agent.save()
    a, b = two
    token_a = join(client, a, agents_token).json()["access_token"]
    again = join(client, a, token_a)
    assert again.status_code == 200 and claims(again.json()["access_token"])["act"]["instance"] == "3f9c2a7b"
    stolen = join(client, b, token_a)
    assert stolen.status_code == 400
    assert stolen.json()["error"] == "invalid_grant" and stolen.json()["reason"] == "instance_mismatch"


def test_an_instance_runs_the_code_exchange_and_keeps_its_refresh_token(
    client: Client, flow: OAuthFlow, scenario: Scenario, two: tuple[SdkInstance, SdkInstance]
) -> None:
    a, b = two
    flow.login()
    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=challenge)))
    body = post_token(
        client,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        a,
    ).json()
    assert claims(body["access_token"])["act"]["instance"] == "3f9c2a7b"
    other = post_token(client, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}, b)
    assert other.status_code == 400 and other.json()["reason"] == "instance_mismatch"
    plain = flow.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert plain.status_code == 400 and plain.json()["reason"] == "instance_mismatch"
    mine = post_token(client, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}, a)
    assert mine.status_code == 200, mine.content
    assert claims(mine.json()["access_token"])["act"] == {
        "sub": f"agent:{scenario.agent.client_id}",
        "instance": "3f9c2a7b",
    }
    assert SessionGrant.objects.get().status == "active"  # a refusal for the wrong instance ends nothing


def test_cut_off_instance_is_refused_at_the_token_endpoint_and_the_other_keeps_working(
    client: Client,
    flow: OAuthFlow,
    scenario: Scenario,
    two: tuple[SdkInstance, SdkInstance],
    agents_token: str,
) -> None:
    a, b = two
    token_a = join(client, a, agents_token).json()["access_token"]
    token_b = join(client, b, agents_token).json()["access_token"]
    row = AgentInstance.objects.get(instance_id="3f9c2a7b")
    agent_instance_cut_off(instance_pk=row.pk, by=f"user:{scenario.user.pk}", user_id=scenario.user.pk)
    cut = AuditEvent.objects.get(event="agent_instance.cut_off")
    assert cut.detail == {"instance": "3f9c2a7b"} and cut.actor == f"user:{scenario.user.pk}"
    tokens_before = AgentInstance.objects.get(pk=row.pk).last_seen

    refused = join(client, a, agents_token)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client" and refused.json()["reason"] == "instance_cut_off"
    (audit,) = refusals()
    assert (audit.detail["instance"], audit.grant_id, audit.user_id) == (
        "3f9c2a7b",
        str(row.grant_id),
        scenario.user.pk,
    )
    assert not AuditEvent.objects.filter(event="token.refused").exists()  # one row, not two
    assert AgentInstance.objects.get(pk=row.pk).last_seen == tokens_before  # nothing changed

    assert flow.introspect(token_a).json() == {"active": False}
    assert flow.introspect(token_b).json()["active"] is True
    assert join(client, b, agents_token).status_code == 200
    assert SessionGrant.objects.get().status == "active"
    assert flow.introspect(agents_token).json()["active"] is True


def test_cut_off_is_guarded_and_only_for_the_owner(
    scenario: Scenario,
    two: tuple[SdkInstance, SdkInstance],
    agents_token: str,
    client: Client,
    django_user_model: type[User],
) -> None:
    a, _ = two
    join(client, a, agents_token)
    row = AgentInstance.objects.get()
    stranger = django_user_model.objects.create_user("stranger", password="x")
    from consent.instances import InstanceNotActive

    with pytest.raises(InstanceNotActive):
        agent_instance_cut_off(instance_pk=row.pk, by=f"user:{stranger.pk}", user_id=stranger.pk)
    agent_instance_cut_off(instance_pk=row.pk, by="admin:root")
    with pytest.raises(InstanceNotActive):
        agent_instance_cut_off(instance_pk=row.pk, by="admin:root")
    assert AuditEvent.objects.filter(event="agent_instance.cut_off").count() == 1


def _forged(scenario: Scenario, agent_key: AgentKey, inst: SdkInstance, **overrides: Any) -> str:
    now = int(time.time())
    body = {
        "iss": scenario.agent.client_id,
        "sub": scenario.agent.client_id,
        "iat": now,
        "exp": now + 600,
        "cnf": {"jwk": inst.key.jwk},
        "instance": inst.instance,
        **overrides,
    }
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None},
        agent_key.private,
        algorithm="ES256",
        headers={"typ": ATTESTATION_TYP, "kid": agent_key.kid},
    )


def _pop(inst: SdkInstance, key: DPoPKey | None = None, **overrides: Any) -> str:
    body = {
        "iss": inst.client_id,
        "aud": ISSUER,
        "jti": secrets.token_urlsafe(16),
        "iat": int(time.time()),
        **overrides,
    }
    return jwt.encode(body, (key or inst.key).private_key, algorithm="ES256", headers={"typ": POP_TYP})


BAD: dict[str, Callable[[Scenario, AgentKey, SdkInstance], dict[str, str]]] = {
    "wrong signer": lambda s, k, i: dict(
        attestation=issue_attestation(
            client_id=s.agent.client_id,
            agent_key=ec.generate_private_key(ec.SECP256R1()),
            instance_jwk=i.key.jwk,
            instance=i.instance,
            key_id=k.kid,
        )
    ),
    "expired": lambda s, k, i: dict(attestation=_forged(s, k, i, exp=int(time.time()) - 120)),
    "lives too long": lambda s, k, i: dict(attestation=_forged(s, k, i, exp=int(time.time()) + 86400)),
    "for another client": lambda s, k, i: dict(attestation=_forged(s, k, i, sub="someone-else")),
    "no instance claim": lambda s, k, i: dict(attestation=_forged(s, k, i, instance=None)),
    "alg none": lambda s, k, i: dict(
        attestation=jwt.encode(
            {
                "iss": s.agent.client_id,
                "sub": s.agent.client_id,
                "exp": int(time.time()) + 60,
                "cnf": {"jwk": i.key.jwk},
                "instance": i.instance,
            },
            None,  # type: ignore[arg-type]  # alg none signs with no key
            algorithm="none",
            headers={"typ": ATTESTATION_TYP},
        )
    ),
    "PoP by another key": lambda s, k, i: dict(pop=_pop(i, DPoPKey.generate())),
    "PoP for another audience": lambda s, k, i: dict(pop=_pop(i, aud="https://elsewhere.example")),
    "stale PoP": lambda s, k, i: dict(pop=_pop(i, iat=int(time.time()) - 600)),
    "PoP names another instance": lambda s, k, i: dict(pop=_pop(i, instance="not-me")),
    "attestation without PoP": lambda s, k, i: dict(pop=""),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_attestations_are_invalid_client_and_audited(
    client: Client,
    scenario: Scenario,
    agent_key: AgentKey,
    two: tuple[SdkInstance, SdkInstance],
    agents_token: str,
    problem: str,
) -> None:
    a, _ = two
    response = join(client, a, agents_token, **headers(a, **BAD[problem](scenario, agent_key, a)))
    assert response.status_code == 401, response.content
    assert response.json()["error"] == "invalid_client"
    assert response.json()["reason"] == "client_authentication_failed"
    (audit,) = AuditEvent.objects.filter(event="token.refused")
    assert audit.error == "invalid_client" and audit.client_id in (scenario.agent.client_id, "someone-else")
    assert not AgentInstance.objects.exists()


def test_a_replayed_pop_is_refused(
    client: Client, two: tuple[SdkInstance, SdkInstance], agents_token: str
) -> None:
    a, _ = two
    pop = a.pop(ISSUER)
    assert join(client, a, agents_token, **headers(a, pop=pop)).status_code == 200
    replayed = join(client, a, agents_token, **headers(a, pop=pop))
    assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_client"
    assert "replayed" in AuditEvent.objects.get(event="token.refused").detail["reason"]


def test_an_instance_id_keeps_its_first_key(
    client: Client,
    scenario: Scenario,
    agent_key: AgentKey,
    two: tuple[SdkInstance, SdkInstance],
    agents_token: str,
) -> None:
    a, _ = two
    assert join(client, a, agents_token).status_code == 200
    impostor = instance(scenario, agent_key, a.instance)  # same id, another key
    refused = join(client, impostor, agents_token)
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    assert AgentInstance.objects.get().jkt == a.key.jkt


def test_dpop_by_an_instance_binds_to_its_attested_key(
    client: Client, two: tuple[SdkInstance, SdkInstance], agents_token: str
) -> None:
    a, b = two
    nonce = client.post("/o/token/")["DPoP-Nonce"]
    url = f"{ISSUER}/o/token/"
    other = join(client, a, agents_token, HTTP_DPOP=b.key.proof("POST", url, nonce=nonce))
    assert other.status_code == 400 and other.json()["error"] == "invalid_dpop_proof"
    bound = join(client, a, agents_token, HTTP_DPOP=a.key.proof("POST", url, nonce=nonce))
    assert bound.status_code == 200, bound.content
    assert claims(bound.json()["access_token"])["cnf"] == {"jkt": a.key.jkt}


# --- what it costs ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_instance_costs_one_statement_more_than_the_agent_as_one(
    client: Client,
    scenario: Scenario,
    two: tuple[SdkInstance, SdkInstance],
    agents_token: str,
    django_assert_max_num_queries: DjangoAssertNumQueries,
) -> None:
    """``tests/consent/test_statement_counts.py`` holds the agent as one to its budget, unchanged; an
    instance adds ``instance_admit``'s one statement (and, on first use only, its audit row)."""
    scenario.agent.refresh_mode = Agent.RefreshMode.EXCHANGE
    scenario.agent.save()
    a, _ = two
    token = join(client, a, agents_token).json()["access_token"]  # first use: the record and its audit row
    with django_assert_max_num_queries(3 + 1):  # token exchange's budget, plus instance_admit
        assert join(client, a, token).status_code == 200


# --- the person's page and the admin ---------------------------------------------------------


def test_the_grant_page_lists_the_instances_and_cuts_one_off_by_post(
    client: Client,
    flow: OAuthFlow,
    scenario: Scenario,
    two: tuple[SdkInstance, SdkInstance],
    agents_token: str,
) -> None:
    a, b = two
    join(client, a, agents_token)
    join(client, b, agents_token)
    grant = SessionGrant.objects.get()
    row = AgentInstance.objects.get(instance_id="3f9c2a7b")
    flow.login()
    page = client.get(f"/grants/{grant.pk}/").content.decode()
    assert "Instances" in page and 'aria-label="Cut off instance 3f9c…"' in page and "b81d…" in page
    url = f"/grants/{grant.pk}/instances/{row.pk}/cut-off/"
    assert client.get(url).status_code == 405  # POST only
    response = client.post(url)
    assert response.status_code == 302 and response["Location"] == f"/grants/{grant.pk}/"
    assert AgentInstance.objects.get(pk=row.pk).status == "cut_off"
    assert AgentInstance.objects.get(instance_id="b81d04e6").status == "active"
    assert client.post(url).status_code == 404  # once only
    page = client.get(f"/grants/{grant.pk}/").content.decode()
    assert 'aria-label="Cut off instance 3f9c…"' not in page and "Cut off</span>" in page
    assert "You cut off Procurement Agent (instance 3f9c…)" in page


def test_the_cut_off_form_needs_csrf_and_the_owner(
    client: Client,
    flow: OAuthFlow,
    scenario: Scenario,
    two: tuple[SdkInstance, SdkInstance],
    agents_token: str,
    django_user_model: type[User],
) -> None:
    from django.test import Client

    a, _ = two
    join(client, a, agents_token)
    grant, row = SessionGrant.objects.get(), AgentInstance.objects.get()
    url = f"/grants/{grant.pk}/instances/{row.pk}/cut-off/"
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(scenario.user)
    assert strict.post(url).status_code == 403
    django_user_model.objects.create_user("stranger", password="pw-stranger-1")
    other = Client()
    other.login(username="stranger", password="pw-stranger-1")
    assert other.post(url).status_code == 404
    assert AgentInstance.objects.get().status == "active"


def test_an_admin_cuts_off_an_instance_through_the_service(
    admin_client: Client, two: tuple[SdkInstance, SdkInstance], agents_token: str, client: Client
) -> None:
    a, _ = two
    join(client, a, agents_token)
    row = AgentInstance.objects.get()
    response = admin_client.post(
        "/admin/consent/agentinstance/", {"action": "cut_off", "_selected_action": [str(row.pk)]}
    )
    assert response.status_code == 302
    row.refresh_from_db()
    assert row.status == "cut_off" and row.cut_off_by.startswith("admin:")
    assert AuditEvent.objects.get(event="agent_instance.cut_off").actor.startswith("admin:")


def test_a_cut_off_instance_cannot_end_the_grant_by_revocation(
    client: Client, scenario: Scenario, two: tuple[SdkInstance, SdkInstance], agents_token: str
) -> None:
    a, b = two
    token_a = join(client, a, agents_token).json()["access_token"]
    agent_instance_cut_off(instance_pk=AgentInstance.objects.get().pk, by="admin:root")
    refused = client.post(
        "/o/revoke/",
        urlencode({"token": token_a}),
        content_type="application/x-www-form-urlencoded",
        **headers(a),
    )
    assert refused.status_code == 401 and refused.json()["reason"] == "instance_cut_off"
    assert SessionGrant.objects.get().status == "active"
    assert AuditEvent.objects.filter(event="agent_instance.refused").count() == 1
    token_b = join(client, b, agents_token).json()["access_token"]
    ended = client.post(
        "/o/revoke/",
        urlencode({"token": token_b}),
        content_type="application/x-www-form-urlencoded",
        **headers(b),
    )
    assert ended.status_code == 200 and SessionGrant.objects.get().status == "revoked"

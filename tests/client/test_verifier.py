"""TokenVerifier: RFC 8725 hygiene, dual authentication, DPoP (RFC 9449 §4.3), action tokens.

Forged tokens (what an attacker can make) are signed here and served from a local JWKS
(``LocalIssuer`` over ``httpx.MockTransport``). Everything the real server can issue is
minted through the real flows and checked against the live stack (``live`` fixture).
"""

import json
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import jwt
import pytest
from django.test import RequestFactory
from time_machine import TimeMachineFixture

from approvals.models import ApprovalRequest
from consent.models import Agent, ScopePolicy
from countersign import (
    ActionMismatch,
    AgentClient,
    AgentNotAllowed,
    AlreadyRedeemed,
    ExpiredToken,
    InsufficientScope,
    InvalidDPoPProof,
    InvalidToken,
    MissingToken,
    ServiceUnavailable,
    TokenVerifier,
    VerifiedToken,
    action_hash,
)
from countersign.asgi import Message, Receive, Scope, Send
from countersign.dpop import DPoPKey, PrivateKey, ReplayCache, normalize_htu, verify_proof
from countersign.verifier import parse_authorization
from tests.approvals.conftest import LEDGER_ENTRY
from tests.client import (
    AGENT_ID,
    AUDIENCE,
    ISSUER,
    RS_ID,
    RS_SECRET,
    LocalIssuer,
    SigningKey,
    consent_over_http,
    hs256_with_public_key,
    officer_decides,
    raw_es256,
    unsigned,
)
from tests.conftest import OAuthFlow, Scenario, basic
from tests.live import LiveStack

URL = "https://catalog.example/items"
METADATA_URL = "https://catalog.example/.well-known/oauth-protected-resource"  # RFC 9728 §3.1, of AUDIENCE


@pytest.fixture
def issuer() -> LocalIssuer:
    return LocalIssuer()


@pytest.fixture
def verifier(issuer: LocalIssuer) -> TokenVerifier:
    return TokenVerifier(
        ISSUER, client_id=RS_ID, client_secret=RS_SECRET, audience=AUDIENCE, http=issuer.client()
    )


# --- the happy path and the result ------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_valid_session_token_names_user_and_agent(alg: str) -> None:
    issuer = LocalIssuer(alg)
    verifier = TokenVerifier(
        ISSUER, client_id=RS_ID, client_secret=RS_SECRET, audience=AUDIENCE, http=issuer.client()
    )
    verified = verifier.verify_session(issuer.mint(), required_scopes=["catalog:read"])
    assert isinstance(verified, VerifiedToken)
    assert (verified.subject, verified.actor, verified.actor_chain) == (
        "user:7",
        f"agent:{AGENT_ID}",
        [f"agent:{AGENT_ID}"],
    )
    assert verified.client_id == AGENT_ID and verified.grant_id == "g-1" and verified.dpop_jkt is None
    assert verified.scopes == {"catalog:read", "budget:read"}
    with pytest.raises(AttributeError):
        verified.subject = "user:1"  # type: ignore[misc]  # frozen: the assignment must fail


# --- RFC 8725: algorithms, typ, iss, aud, exp -----------------------------------------------------


def test_alg_none_is_refused(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        verifier.verify_session(unsigned(issuer.claims(), issuer.key.kid))


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_hs256_signed_with_our_public_key_is_refused(alg: str) -> None:
    issuer = LocalIssuer(alg)
    verifier = TokenVerifier(
        ISSUER, client_id=RS_ID, client_secret=RS_SECRET, audience=AUDIENCE, http=issuer.client()
    )
    forged = hs256_with_public_key(issuer.claims(), issuer.key)
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        verifier.verify_session(forged)


def test_alg_that_does_not_match_the_key_is_refused(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    rsa = SigningKey("RS256", kid=issuer.key.kid)  # an RS256 token naming our EC key's kid
    with pytest.raises(InvalidToken):
        verifier.verify_session(issuer.mint(key=rsa))


def test_token_signed_by_a_key_we_do_not_publish_is_refused(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    impostor = SigningKey("ES256", kid=issuer.key.kid)  # same kid, other key
    with pytest.raises(InvalidToken, match="signature"):
        verifier.verify_session(issuer.mint(key=impostor))


@pytest.mark.parametrize(
    "iss",
    [
        "https://evil.example",
        ISSUER + ".evil.example",  # our issuer as a prefix
        "https://evil.example/" + ISSUER,  # our issuer as a suffix
        ISSUER + "/",
        ISSUER.upper(),
        "https://auth.exampl",  # a prefix of our issuer
    ],
)
def test_foreign_prefixed_or_suffixed_issuer_is_refused(
    issuer: LocalIssuer, verifier: TokenVerifier, iss: str
) -> None:
    with pytest.raises(InvalidToken, match="issuer"):
        verifier.verify_session(issuer.mint(iss=iss))


@pytest.mark.parametrize(
    "aud,message",
    [
        (None, "lacks the aud claim"),
        ([], "lacks the aud claim"),
        (["https://ledger.example"], "aud"),
        ("https://catalog.example.evil", "aud"),
        ([AUDIENCE + "/"], "aud"),
    ],
)
def test_missing_or_foreign_audience_is_refused(
    issuer: LocalIssuer, verifier: TokenVerifier, aud: str | list[str] | None, message: str
) -> None:
    with pytest.raises(InvalidToken, match=message):
        verifier.verify_session(issuer.mint(aud=aud))


def test_audience_may_be_one_of_several(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    assert verifier.verify_session(issuer.mint(aud=["https://budget.example", AUDIENCE])).subject == "user:7"


@pytest.mark.parametrize("claim", ["exp", "iat", "jti", "sub", "iss"])
def test_required_claims(issuer: LocalIssuer, verifier: TokenVerifier, claim: str) -> None:
    with pytest.raises(InvalidToken, match=f"lacks the {claim} claim"):
        verifier.verify_session(issuer.mint(**{claim: None}))


def test_expired_token_is_refused_beyond_the_leeway(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    now = int(time.time())
    with pytest.raises(ExpiredToken, match="expired"):
        verifier.verify_session(issuer.mint(iat=now - 1000, exp=now - 11))
    assert verifier.verify_session(issuer.mint(iat=now - 1000, exp=now - 5)).subject  # inside the 10 s leeway


def test_token_from_the_future_is_refused(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    with pytest.raises(InvalidToken, match="not yet valid"):
        verifier.verify_session(issuer.mint(iat=int(time.time()) + 600))


def test_leeway_is_bounded() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(ISSUER, audience=AUDIENCE, leeway=31)


@pytest.mark.parametrize("typ", [None, "JWT", "action+jwt", "at+jwt+evil"])
def test_session_token_needs_typ_at_jwt(
    issuer: LocalIssuer, verifier: TokenVerifier, typ: str | None
) -> None:
    with pytest.raises(InvalidToken, match="wrong token type"):
        verifier.verify_session(issuer.mint(typ=typ))


def test_application_media_type_form_of_typ_is_accepted(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    assert verifier.verify_session(issuer.mint(typ="application/at+jwt")).subject == "user:7"


def test_session_token_where_action_token_is_required_and_vice_versa(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    details = [LEDGER_ENTRY]
    session = issuer.mint(authorization_details=details, action_hash=action_hash(details))
    with pytest.raises(InvalidToken, match="expected action\\+jwt"):
        verifier.verify_action(session, expected_details=details)
    with pytest.raises(InvalidToken, match="expected at\\+jwt"):
        verifier.verify_session(issuer.action(details))
    assert issuer.calls["redeem"] == 0


def test_oversized_and_malformed_tokens_are_refused_before_parsing(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    with pytest.raises(InvalidToken, match="too large"):
        verifier.verify_session("a" * 8193)
    for junk in ["abc", "a.b", "a.b.c.d", "€.b.c", "!!!.e30.sig"]:
        with pytest.raises(InvalidToken):
            verifier.verify_session(junk)
    with pytest.raises(MissingToken):
        verifier.verify_session("")
    assert issuer.calls["jwks"] == 0


# --- kid, jku, x5u: never a URL ---------------------------------------------------------------


def test_unknown_kid_flood_fetches_the_jwks_at_most_once(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    for _ in range(1000):
        token = issuer.mint(headers={"kid": secrets.token_urlsafe(12)})
        with pytest.raises(InvalidToken, match="unknown key"):
            verifier.verify_session(token)
    assert issuer.calls["jwks"] == 1
    assert verifier.verify_session(issuer.mint()).subject == "user:7"  # the real key still works
    assert issuer.calls["jwks"] == 1


def test_rotated_key_is_picked_up_after_the_refetch_interval(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier(
        ISSUER,
        client_id=RS_ID,
        client_secret=RS_SECRET,
        audience=AUDIENCE,
        http=issuer.client(),
        jwks_min_refetch_interval=0.3,
    )
    verifier.verify_session(issuer.mint())
    new = SigningKey("ES256")
    issuer.keys.append(new)
    with pytest.raises(InvalidToken, match="unknown key"):  # inside the interval: no fetch
        verifier.verify_session(issuer.mint(key=new))
    time.sleep(0.35)
    assert verifier.verify_session(issuer.mint(key=new)).subject == "user:7"
    assert issuer.calls["jwks"] == 2


def test_jku_x5u_and_path_like_kids_are_never_fetched(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    attacker = SigningKey("ES256")
    forged: list[dict[str, Any]] = [
        {"jku": "https://evil.example/jwks.json", "kid": "evil"},
        {"x5u": "https://evil.example/cert.pem", "kid": "evil"},
        {"kid": "../../.well-known/jwks.json"},
        {"kid": "https://evil.example/jwks.json"},
        {"jwk": attacker.jwk, "kid": "evil"},
    ]
    for headers in forged:
        with pytest.raises(InvalidToken):
            verifier.verify_session(issuer.mint(key=attacker, headers=headers))
    for kid in [["a", "list"], {"an": "object"}, None, 7]:
        with pytest.raises(InvalidToken, match="kid"):
            verifier.verify_session(
                raw_es256({"alg": "ES256", "typ": "at+jwt", "kid": kid}, issuer.claims(), issuer.key)
            )
    assert issuer.calls["foreign"] == 0
    assert all(url.startswith(ISSUER + "/") for url in issuer.requested_urls)


def test_metadata_for_another_issuer_is_not_trusted(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    issuer.metadata_issuer = "https://evil.example"
    with pytest.raises(ServiceUnavailable, match="issuer"):
        verifier.verify_session(issuer.mint())


# --- scopes and the acting agent ----------------------------------------------------------------


def test_missing_scope_is_insufficient_scope_with_a_challenge(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    with pytest.raises(InsufficientScope) as caught:
        verifier.verify_session(issuer.mint(), required_scopes=["catalog:read", "po:draft"])
    assert caught.value.status_code == 403
    assert caught.value.www_authenticate() == (
        'Bearer realm="countersign", error="insufficient_scope", '
        'error_description="the token lacks a required scope", scope="catalog:read po:draft"'
    )


def test_error_challenges_follow_rfc6750() -> None:
    assert ExpiredToken("token expired").www_authenticate() == (
        'Bearer realm="countersign", error="invalid_token", error_description="token expired"'
    )
    assert MissingToken("no access token").www_authenticate() == 'Bearer realm="countersign"'
    assert InvalidToken('say "hi"\\', dpop=True).www_authenticate() == (
        'DPoP realm="countersign", error="invalid_token", error_description="say hi"'
    )


def test_suspended_agent_is_refused(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    issuer.agents[AGENT_ID]["status"] = "suspended"
    with pytest.raises(AgentNotAllowed, match="suspended"):
        verifier.verify_session(issuer.mint())


def test_agent_missing_from_the_registry_is_refused(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    with pytest.raises(AgentNotAllowed, match="not a registered agent"):
        verifier.verify_session(issuer.mint(act={"sub": "agent:ghost"}, client_id="ghost"))


def test_act_must_name_an_agent_consistent_with_client_id(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    with pytest.raises(InvalidToken, match="no acting agent"):
        verifier.verify_session(issuer.mint(act=None))
    with pytest.raises(InvalidToken, match="not an agent"):
        verifier.verify_session(issuer.mint(act={"sub": "user:7"}))
    with pytest.raises(InvalidToken, match="differ"):
        verifier.verify_session(issuer.mint(client_id="someone-else"))
    with pytest.raises(InvalidToken, match="malformed act"):
        verifier.verify_session(issuer.mint(act={"sub": f"agent:{AGENT_ID}", "act": "agent:x"}))


def test_only_the_outermost_actor_decides(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    """RFC 8693 §4.1: nested act claims are history, not access-control input."""
    issuer.agents["helper"] = {**issuer.agents[AGENT_ID], "client_id": "helper", "actor": "agent:helper"}
    token = issuer.mint(client_id="helper", act={"sub": "agent:helper", "act": {"sub": f"agent:{AGENT_ID}"}})
    issuer.agents[AGENT_ID]["status"] = "suspended"
    verified = verifier.verify_session(token)
    assert verified.actor == "agent:helper" and verified.actor_chain == ["agent:helper", f"agent:{AGENT_ID}"]
    issuer.agents["helper"]["status"] = "suspended"
    verifier.forget_agent("helper")
    with pytest.raises(AgentNotAllowed):
        verifier.verify_session(token)


def test_registry_answers_are_cached_for_the_ttl(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier(
        ISSUER,
        client_id=RS_ID,
        client_secret=RS_SECRET,
        audience=AUDIENCE,
        http=issuer.client(),
        registry_ttl=0.3,
    )
    for _ in range(20):
        verifier.verify_session(issuer.mint())
    assert issuer.calls["registry"] == 1
    issuer.agents[AGENT_ID]["status"] = "suspended"
    time.sleep(0.35)
    with pytest.raises(AgentNotAllowed):
        verifier.verify_session(issuer.mint())
    assert issuer.calls["registry"] == 2


def test_registry_outage_fails_closed(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    issuer.registry_down = True
    with pytest.raises(ServiceUnavailable) as caught:
        verifier.verify_session(issuer.mint())
    assert caught.value.status_code == 503


def test_wrong_resource_server_credentials_fail_closed(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier(
        ISSUER, client_id=RS_ID, client_secret="wrong", audience=AUDIENCE, http=issuer.client()
    )
    with pytest.raises(ServiceUnavailable, match="HTTP 401"):
        verifier.verify_session(issuer.mint())


# --- DPoP (RFC 9449) ---------------------------------------------------------------------------


@pytest.fixture
def dpop_key(issuer: LocalIssuer) -> DPoPKey:
    key = DPoPKey.generate()
    issuer.agents[AGENT_ID]["jkt"] = [key.jkt]
    return key


def _bound(issuer: LocalIssuer, key: DPoPKey) -> str:
    return issuer.mint(cnf={"jkt": key.jkt})


def test_dpop_bound_token_with_a_good_proof(
    issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey
) -> None:
    token = _bound(issuer, dpop_key)
    proof = dpop_key.proof("GET", URL + "?page=2#x", access_token=token)
    verified = verifier.verify_session(token, dpop_proof=proof, htm="GET", htu=URL + "?page=3", scheme="DPoP")
    assert verified.dpop_jkt == dpop_key.jkt


def _refusal(
    verifier: TokenVerifier,
    token: str,
    proof: str | None,
    *,
    htm: str = "GET",
    htu: str = URL,
    scheme: str = "DPoP",
) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify_session(token, dpop_proof=proof, htm=htm, htu=htu, scheme=scheme)
    assert caught.value.www_authenticate().startswith("DPoP ")
    return caught.value


def test_dpop_proof_by_another_key(issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey) -> None:
    token = _bound(issuer, dpop_key)
    other = DPoPKey.generate()
    exc = _refusal(verifier, token, other.proof("GET", URL, access_token=token))
    assert isinstance(exc, InvalidDPoPProof) and "another key" in exc.description


def test_dpop_proof_for_another_url_or_method(
    issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey
) -> None:
    token = _bound(issuer, dpop_key)
    assert (
        "URL"
        in _refusal(
            verifier, token, dpop_key.proof("GET", "https://catalog.example/admin", access_token=token)
        ).description
    )
    assert (
        "URL"
        in _refusal(
            verifier, token, dpop_key.proof("GET", "https://evil.example/items", access_token=token)
        ).description
    )
    assert "method" in _refusal(verifier, token, dpop_key.proof("POST", URL, access_token=token)).description


def test_dpop_proof_replayed(issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey) -> None:
    token = _bound(issuer, dpop_key)
    proof = dpop_key.proof("GET", URL, access_token=token)
    verifier.verify_session(token, dpop_proof=proof, htm="GET", htu=URL, scheme="DPoP")
    assert "replayed" in _refusal(verifier, token, proof).description


@pytest.mark.parametrize("age", [-61, 61, 3600])
def test_dpop_proof_stale_or_from_the_future(
    issuer: LocalIssuer,
    verifier: TokenVerifier,
    dpop_key: DPoPKey,
    age: int,
    time_machine: TimeMachineFixture,
) -> None:
    # The clock stands still on a whole second: iat is exactly ``age`` from the verifier's now. On a
    # running clock, int() and the time to the check took up to a second off a future proof's 61.
    time_machine.move_to(int(time.time()), tick=False)
    token = _bound(issuer, dpop_key)
    proof = dpop_key.proof("GET", URL, access_token=token, iat=int(time.time()) - age)
    assert "iat" in _refusal(verifier, token, proof).description


def test_dpop_proof_missing_or_token_sent_as_bearer(
    issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey
) -> None:
    token = _bound(issuer, dpop_key)
    assert isinstance(_refusal(verifier, token, None), InvalidDPoPProof)
    proof = dpop_key.proof("GET", URL, access_token=token)
    assert "DPoP scheme" in _refusal(verifier, token, proof, scheme="Bearer").description


def test_dpop_proof_for_another_token(
    issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey
) -> None:
    token, other = _bound(issuer, dpop_key), _bound(issuer, dpop_key)
    assert "ath" in _refusal(verifier, token, dpop_key.proof("GET", URL, access_token=other)).description
    assert "ath" in _refusal(verifier, token, dpop_key.proof("GET", URL)).description


def test_dpop_key_must_be_registered_for_the_agent(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    unregistered = DPoPKey.generate()
    token = _bound(issuer, unregistered)
    exc = _refusal(verifier, token, unregistered.proof("GET", URL, access_token=token))
    assert "not registered" in exc.description


def test_dpop_proof_forgeries(issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey) -> None:
    token = _bound(issuer, dpop_key)
    claims = {
        "jti": secrets.token_urlsafe(16),
        "htm": "GET",
        "htu": URL,
        "iat": int(time.time()),
        "ath": jwt.utils.base64url_encode(__import__("hashlib").sha256(token.encode()).digest()).decode(),
    }
    private_jwk = {**dpop_key.jwk, "d": "x"}
    wrong_typ = jwt.encode(
        claims, dpop_key.private_key, algorithm="ES256", headers={"typ": "JWT", "jwk": dpop_key.jwk}
    )
    no_jwk = jwt.encode(claims, dpop_key.private_key, algorithm="ES256", headers={"typ": "dpop+jwt"})
    with_private = jwt.encode(
        claims, dpop_key.private_key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": private_jwk}
    )
    hmac_proof = jwt.encode(
        claims,
        "secret-secret-secret-secret-1234",
        algorithm="HS256",
        headers={"typ": "dpop+jwt", "jwk": dpop_key.jwk},
    )
    for proof in [wrong_typ, no_jwk, with_private, hmac_proof, "not.a.jwt", token]:
        assert isinstance(_refusal(verifier, token, proof), InvalidDPoPProof)


def test_unbound_token_with_dpop_scheme_is_refused(
    issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey
) -> None:
    token = issuer.mint()
    with pytest.raises(InvalidToken, match="not DPoP-bound"):
        verifier.verify_session(
            token,
            dpop_proof=dpop_key.proof("GET", URL, access_token=token),
            htm="GET",
            htu=URL,
            scheme="DPoP",
        )


def test_proof_builder_and_checker_agree_on_every_algorithm() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    privates: list[PrivateKey] = [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate(),
    ]
    for private in privates:
        key = DPoPKey(private)
        proof = key.proof("POST", "https://AS.example:443/o/token/?q=1", nonce="n-1")
        checked = verify_proof(
            proof,
            htm="POST",
            htu="https://as.example/o/token/",
            nonce="n-1",
            expected_jkt=key.jkt,
            replay_cache=ReplayCache(120),
        )
        assert checked.jkt == key.jkt and "ath" not in checked.claims
    assert normalize_htu("HTTP://Example.COM:80") == "http://example.com/"


def test_replay_cache_forgets_after_its_ttl() -> None:
    cache = ReplayCache(0.2)
    assert cache.add("a") and not cache.add("a")
    time.sleep(0.25)
    assert cache.add("a") and len(cache) == 1


def test_authorization_header_parsing() -> None:
    assert parse_authorization("bearer abc.def.ghi") == ("Bearer", "abc.def.ghi")
    assert parse_authorization("DPoP abc") == ("DPoP", "abc")
    for bad in [None, "", "Basic dXNlcjpwYXNz", "Token x"]:
        with pytest.raises(MissingToken):
            parse_authorization(bad)
    with pytest.raises(Exception, match="malformed"):
        parse_authorization("Bearer a b")


# --- action tokens (locally signed) ---------------------------------------------------------------


def test_action_token_for_another_amount_is_refused_and_not_redeemed(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.action([LEDGER_ENTRY])
    changed = [{**LEDGER_ENTRY, "amount": "42500.00"}]
    with pytest.raises(ActionMismatch):
        verifier.verify_action(token, expected_details=changed)
    assert issuer.calls["redeem"] == 0
    assert verifier.verify_action(
        token, expected_details=[dict(reversed(list(LEDGER_ENTRY.items())))]
    ).is_action


def test_action_token_whose_hash_does_not_match_its_details(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    tampered = issuer.action([LEDGER_ENTRY], action_hash=action_hash([{**LEDGER_ENTRY, "amount": "1.00"}]))
    with pytest.raises(ActionMismatch, match="its authorization_details"):
        verifier.verify_action(tampered, expected_details=[{**LEDGER_ENTRY, "amount": "1.00"}])
    assert issuer.calls["redeem"] == 0


# --- against the live server ----------------------------------------------------------------------


@pytest.fixture
def live_http_client(live: LiveStack) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15) as client:
        yield client


def _verifier(
    live: LiveStack, http: httpx.Client, *, client_id: str, secret: str, audience: str, **kwargs: Any
) -> TokenVerifier:
    return TokenVerifier(
        live.url, client_id=client_id, client_secret=secret, audience=audience, http=http, **kwargs
    )


@pytest.fixture
def catalog(live: LiveStack, scenario: Scenario, live_http_client: httpx.Client) -> TokenVerifier:
    return _verifier(
        live,
        live_http_client,
        client_id=scenario.rs_client_id,
        secret=scenario.rs_secret,
        audience=scenario.rs_audience,
    )


@pytest.fixture
def ledger(live: LiveStack, scenario: Scenario, live_http_client: httpx.Client) -> TokenVerifier:
    return _verifier(
        live,
        live_http_client,
        client_id=scenario.ledger_client_id,
        secret=scenario.ledger_secret,
        audience="http://ledger.test",
    )


@pytest.fixture
def session_token(live: LiveStack, flow: OAuthFlow, ledger_policy: ScopePolicy) -> str:  # noqa: F811
    token: str = flow.full()["access_token"]
    flow.client.logout()
    return token


def test_live_session_token_verifies_with_the_servers_jwks(
    live: LiveStack, scenario: Scenario, catalog: TokenVerifier, session_token: str
) -> None:
    verified = catalog.verify_session(session_token, required_scopes=["catalog:read", "budget:read"])
    assert verified.subject == f"user:{scenario.user.pk}"
    assert verified.actor == f"agent:{scenario.agent.client_id}"
    assert verified.scopes == {"catalog:read", "budget:read"}  # the step-up scope never rides on it
    with pytest.raises(InsufficientScope):
        catalog.verify_session(session_token, required_scopes=["ledger:write"])


def test_live_session_token_is_not_for_the_ledger(ledger: TokenVerifier, session_token: str) -> None:
    with pytest.raises(InvalidToken, match="aud"):
        ledger.verify_session(session_token)


def test_live_suspended_agent_is_refused(
    live: LiveStack, scenario: Scenario, catalog: TokenVerifier, session_token: str
) -> None:
    catalog.verify_session(session_token)
    Agent.objects.filter(pk=scenario.agent.pk).update(status=Agent.Status.SUSPENDED)
    catalog.forget_agent(scenario.agent.client_id)  # else refused after registry_ttl
    with pytest.raises(AgentNotAllowed, match="suspended"):
        catalog.verify_session(session_token)


def test_live_registry_contract(live: LiveStack, scenario: Scenario) -> None:
    """The server's agent registry endpoint, as the verifier relies on it."""
    assert httpx.get(f"{live.url}/.well-known/oauth-authorization-server").json()[
        "agent_registry_endpoint"
    ] == (f"{live.url}/o/agents/")
    auth = {"Authorization": basic(scenario.rs_client_id, scenario.rs_secret)}
    found = httpx.get(f"{live.url}/o/agents/{scenario.agent.client_id}", headers=auth, timeout=5)
    assert found.status_code == 200
    assert found.json()["actor"] == f"agent:{scenario.agent.client_id}" and found.json()["status"] == "active"
    assert httpx.get(f"{live.url}/o/agents/nobody", headers=auth, timeout=5).status_code == 404
    assert httpx.get(f"{live.url}/o/agents/{scenario.agent.client_id}", timeout=5).status_code == 401


def _action_token(
    live: LiveStack, scenario: Scenario, session_token: str, details: list[dict[str, Any]]
) -> str:
    """A real action token: CIBA request to the live server, officer approves, agent polls."""
    auth = {"Authorization": basic(scenario.agent.client_id, scenario.agent_secret)}
    asked = httpx.post(
        f"{live.url}/o/bc-authorize/",
        headers=auth,
        timeout=10,
        data={
            "scope": "ledger:write",
            "login_hint_token": session_token,
            "authorization_details": json.dumps(details),
        },
    )
    assert asked.status_code == 200, asked.text
    with officer_decides(scenario.user):
        time.sleep(asked.json()["interval"])
    polled = httpx.post(
        f"{live.url}/o/token/",
        headers=auth,
        timeout=10,
        data={"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": asked.json()["auth_req_id"]},
    )
    assert polled.status_code == 200, polled.text
    token: str = polled.json()["access_token"]
    return token


def test_live_action_token_redeems_once(
    live: LiveStack, scenario: Scenario, ledger: TokenVerifier, catalog: TokenVerifier, session_token: str
) -> None:
    token = _action_token(live, scenario, session_token, [LEDGER_ENTRY])
    with pytest.raises(InvalidToken, match="expected at\\+jwt"):
        ledger.verify_session(token)
    with pytest.raises(InvalidToken, match="expected action\\+jwt"):
        ledger.verify_action(session_token, expected_details=[LEDGER_ENTRY])
    with pytest.raises(InvalidToken, match="aud"):
        catalog.verify_action(token, expected_details=[LEDGER_ENTRY])
    with pytest.raises(ActionMismatch):
        ledger.verify_action(token, expected_details=[{**LEDGER_ENTRY, "amount": "42500.00"}])
    assert (
        ApprovalRequest.objects.get().status == ApprovalRequest.Status.ISSUED
    )  # the mismatch burned nothing
    verified = ledger.verify_action(token, expected_details=[LEDGER_ENTRY])
    assert verified.authorization_details == [LEDGER_ENTRY] and verified.scopes == {"ledger:write"}
    assert ApprovalRequest.objects.get().status == ApprovalRequest.Status.REDEEMED
    with pytest.raises(AlreadyRedeemed):
        ledger.verify_action(token, expected_details=[LEDGER_ENTRY])


@pytest.fixture
def dpop_agent(live: LiveStack, scenario: Scenario, ledger_policy: ScopePolicy) -> AgentClient:  # noqa: F811
    """The seeded agent with a registered DPoP key, through the real token endpoint."""
    from tests.conftest import REDIRECT_URI

    key = DPoPKey.generate()
    scenario.agent.jwks = {"keys": [{**key.jwk, "kid": "dpop-1", "alg": "ES256"}]}
    scenario.agent.save()
    agent = AgentClient(
        live.url,
        scenario.agent.client_id,
        client_secret=scenario.agent_secret,
        redirect_uri=REDIRECT_URI,
        dpop_key=key,
    )
    url, state, verifier = agent.authorization_url(["catalog:read", "budget:read", "ledger:write"])
    tokens = agent.exchange_code(consent_over_http(live, scenario.user, url, state), verifier)
    assert tokens.dpop_bound and tokens.token_type == "DPoP"
    return agent


def _present(agent: AgentClient, *, method: str = "GET", url: str = URL) -> tuple[str, str, str]:
    headers = agent.auth_headers(method, url)
    scheme, token = parse_authorization(headers["Authorization"])
    return scheme, token, headers["DPoP"]


def test_live_dpop_bound_token(catalog: TokenVerifier, dpop_agent: AgentClient) -> None:
    assert dpop_agent.dpop_key is not None
    scheme, token, proof = _present(dpop_agent)
    assert jwt.decode(token, options={"verify_signature": False})["cnf"] == {"jkt": dpop_agent.dpop_key.jkt}
    verified = catalog.verify_session(token, dpop_proof=proof, htm="GET", htu=URL, scheme=scheme)
    assert verified.dpop_jkt == dpop_agent.dpop_key.jkt
    with pytest.raises(InvalidDPoPProof, match="replayed"):
        catalog.verify_session(token, dpop_proof=proof, htm="GET", htu=URL, scheme=scheme)
    thief = DPoPKey.generate()  # a stolen token with the thief's own proof
    with pytest.raises(InvalidDPoPProof, match="another key"):
        catalog.verify_session(
            token, dpop_proof=thief.proof("GET", URL, access_token=token), htm="GET", htu=URL, scheme="DPoP"
        )
    with pytest.raises(InvalidDPoPProof, match="URL"):
        _, _, other_url = _present(dpop_agent, url="https://catalog.example/other")
        catalog.verify_session(token, dpop_proof=other_url, htm="GET", htu=URL, scheme="DPoP")
    with pytest.raises(InvalidDPoPProof):
        catalog.verify_session(token, htm="GET", htu=URL, scheme="DPoP")
    with pytest.raises(InvalidToken, match="DPoP scheme"):
        catalog.verify_session(token, dpop_proof=_present(dpop_agent)[2], htm="GET", htu=URL, scheme="Bearer")


def test_live_dpop_key_withdrawn_from_the_registry(
    live: LiveStack, scenario: Scenario, catalog: TokenVerifier, dpop_agent: AgentClient
) -> None:
    scheme, token, proof = _present(dpop_agent)
    scenario.agent.jwks = {"keys": [{**DPoPKey.generate().jwk, "kid": "new-1", "alg": "ES256"}]}
    scenario.agent.save()
    with pytest.raises(InvalidDPoPProof, match="not registered"):
        catalog.verify_session(token, dpop_proof=proof, htm="GET", htu=URL, scheme=scheme)


def test_live_agent_requiring_dpop_cannot_use_a_bearer_token(
    live: LiveStack, scenario: Scenario, catalog: TokenVerifier, session_token: str
) -> None:
    Agent.objects.filter(pk=scenario.agent.pk).update(require_dpop=True)
    with pytest.raises(InvalidToken, match="only use DPoP-bound"):
        catalog.verify_session(session_token)


def test_live_dpop_bound_action_token(
    live: LiveStack, scenario: Scenario, ledger: TokenVerifier, dpop_agent: AgentClient
) -> None:
    assert dpop_agent.dpop_key is not None
    with officer_decides(scenario.user):
        action = dpop_agent.request_approval("ledger:write", [LEDGER_ENTRY], timeout=30)
    assert action.dpop_bound
    url = "https://ledger.example/entries"
    headers = dpop_agent.auth_headers("POST", url, token=action)
    with pytest.raises(InvalidDPoPProof):  # the proof is checked before redemption burns the token
        ledger.verify_action(
            action.token, expected_details=[LEDGER_ENTRY], htm="POST", htu=url, scheme="DPoP"
        )
    verified = ledger.verify_action(
        action.token,
        expected_details=[LEDGER_ENTRY],
        dpop_proof=headers["DPoP"],
        htm="POST",
        htu=url,
        scheme="DPoP",
    )
    assert verified.dpop_jkt == dpop_agent.dpop_key.jkt


# --- integrations: Django decorators and the ASGI middleware ----------------------------------------


def test_django_requires_scope(issuer: LocalIssuer, verifier: TokenVerifier, rf: RequestFactory) -> None:
    from django.http import JsonResponse

    from countersign.django import requires_scope

    @requires_scope("catalog:read", verifier=verifier)
    def items(request: Any) -> JsonResponse:  # Any: the decorator adds .countersign to the request
        return JsonResponse({"user": request.countersign.subject, "agent": request.countersign.actor})

    ok = items(rf.get("/items", HTTP_AUTHORIZATION=f"Bearer {issuer.mint()}"))
    assert ok.status_code == 200 and json.loads(ok.content) == {
        "user": "user:7",
        "agent": f"agent:{AGENT_ID}",
    }
    missing = items(rf.get("/items"))
    assert missing.status_code == 401 and missing["WWW-Authenticate"] == (
        f'Bearer realm="countersign", resource_metadata="{METADATA_URL}"'
    )
    expired = items(rf.get("/items", HTTP_AUTHORIZATION=f"Bearer {issuer.mint(exp=int(time.time()) - 60)}"))
    assert expired.status_code == 401 and json.loads(expired.content)["error"] == "invalid_token"
    assert expired["WWW-Authenticate"] == (
        'Bearer realm="countersign", error="invalid_token", error_description="token expired", '
        f'resource_metadata="{METADATA_URL}"'
    )
    narrow = items(rf.get("/items", HTTP_AUTHORIZATION=f"Bearer {issuer.mint(scope='budget:read')}"))
    assert narrow.status_code == 403 and 'error="insufficient_scope"' in narrow["WWW-Authenticate"]


def test_django_requires_scope_with_dpop_and_async_views(
    issuer: LocalIssuer, verifier: TokenVerifier, dpop_key: DPoPKey, rf: RequestFactory
) -> None:
    import asyncio

    from django.http import JsonResponse

    from countersign.django import requires_scope

    @requires_scope("catalog:read", verifier=verifier)
    async def items(request: Any) -> JsonResponse:  # Any: the decorator adds .countersign to the request
        return JsonResponse({"jkt": request.countersign.dpop_jkt})

    token = _bound(issuer, dpop_key)
    url = "http://testserver/items"
    proof = dpop_key.proof("GET", url + "?q=1", access_token=token)
    ok = asyncio.run(items(rf.get("/items?q=1", HTTP_AUTHORIZATION=f"DPoP {token}", HTTP_DPOP=proof)))
    assert ok.status_code == 200 and json.loads(ok.content) == {"jkt": dpop_key.jkt}
    replay = asyncio.run(items(rf.get("/items", HTTP_AUTHORIZATION=f"DPoP {token}", HTTP_DPOP=proof)))
    assert replay.status_code == 401 and replay["WWW-Authenticate"].startswith(
        'DPoP realm="countersign", error="invalid_dpop_proof"'
    )


def test_django_requires_action_redeems_before_the_view_runs(
    issuer: LocalIssuer, verifier: TokenVerifier, rf: RequestFactory
) -> None:
    from django.http import JsonResponse

    from countersign.django import requires_action

    ran: list[str] = []

    @requires_action("ledger:write", details=lambda request: [json.loads(request.body)], verifier=verifier)
    def append(request: Any) -> JsonResponse:  # Any: the decorator adds .countersign to the request
        ran.append(request.countersign.claims["approval_id"])
        return JsonResponse({"ok": True}, status=201)

    token = issuer.action([LEDGER_ENTRY])

    def post(body: dict[str, Any]) -> JsonResponse:
        return append(
            rf.post(
                "/entries",
                json.dumps(body),
                content_type="application/json",
                HTTP_AUTHORIZATION=f"Bearer {token}",
            )
        )

    changed = post({**LEDGER_ENTRY, "amount": "42500.00"})
    assert changed.status_code == 403 and issuer.calls["redeem"] == 0
    assert post(LEDGER_ENTRY).status_code == 201
    again = post(LEDGER_ENTRY)
    assert again.status_code == 401 and "already redeemed" in again["WWW-Authenticate"]
    assert ran == ["a-1"]
    junk = append(
        rf.post("/entries", "{", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")
    )
    assert junk.status_code == 400 and json.loads(junk.content)["error"] == "invalid_request"


def test_asgi_middleware(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    import asyncio

    from countersign.asgi import CountersignMiddleware

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = json.dumps({"user": scope["countersign"].subject}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    protected = CountersignMiddleware(
        app, verifier, required_scopes=["catalog:read"], exempt_paths=["/health"]
    )

    def call(path: str, headers: Sequence[tuple[bytes, bytes]] = (), kind: str = "http") -> list[Message]:
        scope: Scope = {
            "type": kind,
            "method": "GET",
            "scheme": "https",
            "path": path,
            "root_path": "",
            "headers": [(b"host", b"catalog.example"), *headers],
            "server": ("catalog.example", 443),
        }
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "websocket.connect"}

        async def send(message: Message) -> None:
            sent.append(message)

        asyncio.run(protected(scope, receive, send))
        return sent

    ok = call("/items", [(b"authorization", f"Bearer {issuer.mint()}".encode())])
    assert ok[0]["status"] == 200 and json.loads(ok[1]["body"]) == {"user": "user:7"}
    refused = call("/items", [(b"authorization", f"Bearer {issuer.mint(scope='budget:read')}".encode())])
    assert refused[0]["status"] == 403
    assert (
        b"www-authenticate",
        b'Bearer realm="countersign", error="insufficient_scope", '
        b'error_description="the token lacks a required scope", scope="catalog:read", '
        b'resource_metadata="' + METADATA_URL.encode() + b'"',
    ) in refused[0]["headers"]
    assert call("/items")[0]["status"] == 401
    assert call("/items", kind="websocket") == [
        {"type": "websocket.close", "code": 1008, "reason": "invalid_token"}
    ]
    with pytest.raises(KeyError):  # exempt paths reach the app without a token (and without a result)
        call("/health")

"""Signing keys, the JWKS, rotation, and JWT hygiene (RFC 7517, RFC 8725, RFC 9068).

Forged tokens are checked twice: by ``consent.tokens.verify`` directly, and at the
introspection endpoint. For the endpoint, the forged token is also given a token
row in the database (as if it had been issued), so that an "inactive" answer
can only come from verification refusing it, not from a missing row.
"""

import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import timedelta
from io import StringIO
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from jwt.algorithms import ECAlgorithm
from oauth2_provider.models import set_token_value

from audit.models import AuditEvent
from consent.conf import countersign_settings
from consent.keys import reset_key_cache
from consent.models import AccessToken, SigningKey
from consent.tokens import ACTION_TOKEN_TYP, SESSION_TOKEN_TYP, TokenInvalid, sign, verify
from tests.conftest import OAuthFlow, Scenario

pytestmark = pytest.mark.django_db

ISSUER = "http://127.0.0.1:8000"
CATALOG = "http://catalog.test"
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


# --- helpers --------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _seg(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _header(token: str) -> dict[str, Any]:
    return jwt.get_unverified_header(token)


def _jwks(client: Client) -> dict[str, dict[str, Any]]:
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    return {k["kid"]: k for k in response.json()["keys"]}


def _verify_with_jwks(client: Client, token: str, audience: str = CATALOG) -> dict[str, Any]:
    """What a downstream resource server does: pick the key by kid from our JWKS."""
    header = _header(token)
    key = _jwks(client)[header["kid"]]
    return jwt.decode(
        token,
        jwt.PyJWK(key),
        algorithms=["ES256", "RS256"],
        audience=audience,
        issuer=ISSUER,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )


def _as_issued(forged: str, like: str) -> None:
    """Give ``forged`` a token row copied from the real token ``like``."""
    real = AccessToken.objects.get(token_checksum=hashlib.sha256(like.encode()).hexdigest())
    row = AccessToken(
        user=real.user,
        application=real.application,
        scope=real.scope,
        expires=real.expires,
        session_grant=real.session_grant,
        jti=secrets.token_urlsafe(16),
    )
    set_token_value(row, forged)
    row.save()


def _refused_everywhere(flow: OAuthFlow, forged: str, like: str, *, typ: str = SESSION_TOKEN_TYP) -> None:
    with pytest.raises(TokenInvalid):
        verify(forged, typ=typ)
    with pytest.raises(TokenInvalid):
        verify(forged, typ=typ, audience=CATALOG)
    _as_issued(forged, like)
    response = flow.introspect(forged)
    assert response.status_code == 200
    assert response.json() == {"active": False}
    latest = AuditEvent.objects.order_by("-id").first()
    assert latest is not None and latest.outcome == "refused"


def _sign_raw(claims: dict[str, Any], *, typ: str = SESSION_TOKEN_TYP) -> str:
    """Sign arbitrary JSON with our real active key (PyJWT's encode would refuse odd claim types)."""
    from consent.keys import active_signing_key

    k = active_signing_key()
    return jwt.PyJWS().encode(
        json.dumps(claims).encode(), k.private_key, algorithm=k.alg, headers={"kid": k.kid, "typ": typ}
    )


def _active_kid() -> str:
    return SigningKey.objects.get(active=True).kid


@pytest.fixture
def issued(flow: OAuthFlow) -> dict[str, Any]:
    """A real session token (and the whole token response) from the code flow."""
    body = flow.full()
    return body


# --- JWKS -----------------------------------------------------------------------------------------


def test_jwks_publishes_the_active_key_and_nothing_private(client: Client, issued: dict[str, Any]) -> None:
    keys = _jwks(client)
    active = SigningKey.objects.get(active=True)
    assert active.kid in keys
    assert keys[active.kid]["alg"] == "ES256" and keys[active.kid]["use"] == "sig"
    for key in keys.values():
        assert not PRIVATE_JWK_MEMBERS & set(key), key
    assert _header(issued["access_token"])["kid"] == active.kid
    claims = _verify_with_jwks(client, issued["access_token"])
    assert claims["iss"] == ISSUER


def test_jwks_on_a_fresh_install_already_has_a_key(client: Client, db: None) -> None:
    keys = _jwks(client)
    assert len(keys) == 1 and _active_kid() in keys


def test_metadata_points_at_the_jwks(client: Client, db: None) -> None:
    meta = client.get("/.well-known/oauth-authorization-server").json()
    assert meta["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
    assert meta["issuer"] == ISSUER


# --- rotation -------------------------------------------------------------------------------------


def test_rotation_makes_a_new_active_key_and_keeps_the_old_one_published(
    flow: OAuthFlow, client: Client, issued: dict[str, Any]
) -> None:
    old_token = issued["access_token"]
    old_kid = _header(old_token)["kid"]
    out = StringIO()
    call_command("rotate_signing_key", stdout=out)
    new_kid = _active_kid()
    assert new_kid != old_kid and new_kid in out.getvalue()

    old = SigningKey.objects.get(kid=old_kid)
    assert old.active is False and old.retired_at is not None
    # published at least until every token it signed has expired
    assert old.publish_until is not None and old.publish_until.timestamp() >= _claims(old_token)["exp"]

    keys = _jwks(client)
    assert {old_kid, new_kid} <= set(keys)
    # a token signed before rotation still verifies, downstream and here
    assert _verify_with_jwks(client, old_token)["jti"] == _claims(old_token)["jti"]
    assert verify(old_token, typ=SESSION_TOKEN_TYP, audience=CATALOG)["jti"] == _claims(old_token)["jti"]
    assert flow.introspect(old_token).json()["active"] is True

    # new tokens are signed with the new key, and verify against the JWKS too
    refreshed = flow.token({"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]})
    assert refreshed.status_code == 200
    new_token = refreshed.json()["access_token"]
    assert _header(new_token)["kid"] == new_kid
    _verify_with_jwks(client, new_token)
    assert AuditEvent.objects.filter(event="signing_key.rotated").count() == 1


def test_rotation_covers_the_longest_token_lifetime_of_any_agent(
    flow: OAuthFlow, scenario: Scenario, db: None
) -> None:
    from consent.services import agent_update
    from tests.conftest import REDIRECT_URI, pkce_pair

    agent_update(agent=scenario.agent, changes={"access_token_ttl": 6 * 3600})
    flow.login()
    verifier, challenge = pkce_pair()
    code = flow.code_from(flow.consent(flow.authorize_query(challenge=challenge), lifetime=24 * 3600))
    body = flow.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        }
    ).json()
    long_lived = body["access_token"]
    assert _claims(long_lived)["exp"] - _claims(long_lived)["iat"] == 6 * 3600
    call_command("rotate_signing_key", stdout=StringIO())
    old = SigningKey.objects.get(kid=_header(long_lived)["kid"])
    assert old.publish_until is not None and old.publish_until.timestamp() >= _claims(long_lived)["exp"]


def test_old_kid_leaves_the_jwks_once_its_publish_window_is_over(
    client: Client, issued: dict[str, Any]
) -> None:
    old_kid = _header(issued["access_token"])["kid"]
    call_command("rotate_signing_key", stdout=StringIO())
    new_kid = _active_kid()
    SigningKey.objects.filter(kid=old_kid).update(publish_until=timezone.now() - timedelta(seconds=1))
    keys = _jwks(client)
    assert old_kid not in keys and new_kid in keys
    with pytest.raises(KeyError):
        _verify_with_jwks(client, issued["access_token"])


def test_a_token_whose_key_left_the_jwks_no_longer_verifies_here_either(
    flow: OAuthFlow, issued: dict[str, Any]
) -> None:
    """verify() and introspection trust exactly the keys the JWKS publishes, in every process."""
    token = issued["access_token"]
    old_kid = _header(token)["kid"]
    call_command("rotate_signing_key", stdout=StringIO())
    SigningKey.objects.filter(kid=old_kid).update(publish_until=timezone.now() - timedelta(seconds=1))
    with pytest.raises(TokenInvalid):
        verify(token, typ=SESSION_TOKEN_TYP)
    assert flow.introspect(token).json() == {"active": False}


def test_a_token_whose_key_left_the_jwks_is_refused_by_a_fresh_process(
    flow: OAuthFlow, issued: dict[str, Any]
) -> None:
    token = issued["access_token"]
    old_kid = _header(token)["kid"]
    call_command("rotate_signing_key", stdout=StringIO())
    SigningKey.objects.filter(kid=old_kid).update(publish_until=timezone.now() - timedelta(seconds=1))
    reset_key_cache()  # as a freshly started worker would be
    with pytest.raises(TokenInvalid):
        verify(token, typ=SESSION_TOKEN_TYP)
    assert flow.introspect(token).json() == {"active": False}


def test_rotating_twice_keeps_both_retired_keys_until_their_windows_end(
    client: Client, issued: dict[str, Any]
) -> None:
    first = _active_kid()
    call_command("rotate_signing_key", stdout=StringIO())
    second = _active_kid()
    call_command("rotate_signing_key", stdout=StringIO())
    third = _active_kid()
    assert len({first, second, third}) == 3
    assert {first, second, third} <= set(_jwks(client))
    assert SigningKey.objects.filter(active=True).count() == 1


def test_rotation_to_rs256_signs_new_tokens_with_rsa(
    flow: OAuthFlow, client: Client, issued: dict[str, Any]
) -> None:
    call_command("rotate_signing_key", "--alg", "RS256", stdout=StringIO())
    refreshed = flow.token({"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]}).json()
    token = refreshed["access_token"]
    assert _header(token)["alg"] == "RS256"
    key = _jwks(client)[_header(token)["kid"]]
    assert key["kty"] == "RSA" and not PRIVATE_JWK_MEMBERS & set(key)
    _verify_with_jwks(client, token)
    assert verify(token, typ=SESSION_TOKEN_TYP)["sub"] == _claims(issued["access_token"])["sub"]
    assert flow.introspect(token).json()["active"] is True


def test_rotation_refuses_a_symmetric_algorithm(db: None) -> None:
    call_command("rotate_signing_key", stdout=StringIO())
    before = list(SigningKey.objects.values_list("kid", flat=True))
    with pytest.raises(CommandError):
        call_command("rotate_signing_key", "--alg", "HS256", stdout=StringIO(), stderr=StringIO())
    assert list(SigningKey.objects.values_list("kid", flat=True)) == before


# --- forged and malformed tokens ------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(flow: OAuthFlow, issued: dict[str, Any], alg: str) -> None:
    real = issued["access_token"]
    header = {"alg": alg, "typ": SESSION_TOKEN_TYP, "kid": _header(real)["kid"]}
    forged = f"{_seg(header)}.{_seg(_claims(real))}."
    _refused_everywhere(flow, forged, real)


def _hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{_seg(header)}.{_seg(claims)}"
    return signing_input + "." + _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def _public_key_materials(client: Client, kid: str) -> list[bytes]:
    """Every form of our public key an attacker might use as an HMAC secret."""
    public_jwk = _jwks(client)[kid]
    public = jwt.PyJWK(public_jwk).key
    return [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        json.dumps(public_jwk).encode(),
        json.dumps(public_jwk, separators=(",", ":"), sort_keys=True).encode(),
    ]


@pytest.mark.parametrize("form", [0, 1, 2, 3])
def test_hs256_signed_with_our_public_key_is_refused(
    flow: OAuthFlow, client: Client, issued: dict[str, Any], form: int
) -> None:
    real = issued["access_token"]
    kid = _header(real)["kid"]
    header = {"alg": "HS256", "typ": SESSION_TOKEN_TYP, "kid": kid}
    forged = _hs256(header, _claims(real), _public_key_materials(client, kid)[form])
    _refused_everywhere(flow, forged, real)


def test_signature_by_an_attacker_key_under_our_kid_is_refused(
    flow: OAuthFlow, issued: dict[str, Any]
) -> None:
    real = issued["access_token"]
    attacker = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        _claims(real),
        attacker,
        algorithm="ES256",
        headers={"kid": _header(real)["kid"], "typ": SESSION_TOKEN_TYP},
    )
    _refused_everywhere(flow, forged, real)


@pytest.mark.parametrize("where", ["jku", "x5u", "jwk"])
def test_keys_named_by_the_token_itself_are_never_used(
    flow: OAuthFlow, issued: dict[str, Any], where: str
) -> None:
    """RFC 8725 §3.10: a token cannot bring its own key (jku/x5u URLs, embedded jwk)."""
    real = issued["access_token"]
    attacker = ec.generate_private_key(ec.SECP256R1())
    attacker_jwk = json.loads(ECAlgorithm.to_jwk(attacker.public_key()))
    headers = {"typ": SESSION_TOKEN_TYP, "kid": "attacker-key"}
    if where == "jwk":
        headers["jwk"] = attacker_jwk
    else:
        headers[where] = "http://127.0.0.1:1/jwks.json"
    forged = jwt.encode(_claims(real), attacker, algorithm="ES256", headers=headers)
    _refused_everywhere(flow, forged, real)


@pytest.mark.parametrize(
    "kid", ["../../../etc/passwd", "' OR '1'='1", "http://127.0.0.1:1/key", "x" * 500, None]
)
def test_unknown_or_hostile_kid_is_refused(flow: OAuthFlow, issued: dict[str, Any], kid: str | None) -> None:
    real = issued["access_token"]
    attacker = ec.generate_private_key(ec.SECP256R1())
    headers = {"typ": SESSION_TOKEN_TYP}
    if kid is not None:
        headers["kid"] = kid
    forged = jwt.encode(_claims(real), attacker, algorithm="ES256", headers=headers)
    _refused_everywhere(flow, forged, real)


@pytest.mark.parametrize(
    "typ", [ACTION_TOKEN_TYP, "JWT", "jwt", "AT+JWT", "application/at+jwt", "dpop+jwt", None]
)
def test_session_token_with_the_wrong_typ_is_refused(
    flow: OAuthFlow, issued: dict[str, Any], typ: str | None
) -> None:
    real = issued["access_token"]
    key = _active_kid()
    assert _header(real)["kid"] == key
    if typ is None:
        # signed with our real key, but with no typ header at all
        from consent.keys import active_signing_key

        k = active_signing_key()
        forged = jwt.encode(
            _claims(real), k.private_key, algorithm=k.alg, headers={"kid": k.kid, "typ": None}
        )
        assert "typ" not in _header(forged)
    else:
        forged = sign(_claims(real), typ=typ)
    _refused_everywhere(flow, forged, real)


def test_session_token_is_not_an_action_token(issued: dict[str, Any]) -> None:
    with pytest.raises(TokenInvalid):
        verify(issued["access_token"], typ=ACTION_TOKEN_TYP)


def test_action_token_is_not_a_session_token(flow: OAuthFlow, issued: dict[str, Any]) -> None:
    real = issued["access_token"]
    action = sign(
        {
            **_claims(real),
            "scope": "ledger:write",
            "aud": "http://ledger.test",
            "authorization_details": [{"type": "ledger_entry"}],
        },
        typ=ACTION_TOKEN_TYP,
    )
    assert verify(action, typ=ACTION_TOKEN_TYP)["scope"] == "ledger:write"
    with pytest.raises(TokenInvalid):
        verify(action, typ=SESSION_TOKEN_TYP)


@pytest.mark.parametrize(
    "iss",
    [
        ISSUER[:-1],  # prefix
        ISSUER + "0",  # suffix
        ISSUER + "/",  # trailing slash
        ISSUER + ".evil.example",
        ISSUER + "@evil.example",
        "https://127.0.0.1:8000",
        ISSUER.upper(),
        "",
        [ISSUER],
    ],
)
def test_issuer_must_match_exactly(flow: OAuthFlow, issued: dict[str, Any], iss: str | list[str]) -> None:
    real = issued["access_token"]
    forged = _sign_raw({**_claims(real), "iss": iss})
    _refused_everywhere(flow, forged, real)


@pytest.mark.parametrize("missing", ["iss", "sub", "aud", "exp", "iat", "jti"])
def test_tokens_missing_a_required_claim_are_refused(
    flow: OAuthFlow, issued: dict[str, Any], missing: str
) -> None:
    real = issued["access_token"]
    claims = _claims(real)
    del claims[missing]
    forged = sign(claims, typ=SESSION_TOKEN_TYP)
    _refused_everywhere(flow, forged, real)


def test_expired_token_is_refused_with_only_a_small_leeway(flow: OAuthFlow, issued: dict[str, Any]) -> None:
    real = issued["access_token"]
    now = int(time.time())
    expired = sign({**_claims(real), "iat": now - 1000, "exp": now - 60}, typ=SESSION_TOKEN_TYP)
    assert countersign_settings.LEEWAY_SECONDS <= 30
    _refused_everywhere(flow, expired, real)


def test_token_for_another_audience_is_refused_when_audience_is_checked(issued: dict[str, Any]) -> None:
    with pytest.raises(TokenInvalid):
        verify(issued["access_token"], typ=SESSION_TOKEN_TYP, audience="http://ledger.test")
    with pytest.raises(TokenInvalid):
        verify(issued["access_token"], typ=SESSION_TOKEN_TYP, audience="http://catalog.test.evil")


def test_tampered_payload_is_refused(flow: OAuthFlow, issued: dict[str, Any]) -> None:
    real = issued["access_token"]
    h, _, s = real.split(".")
    claims = {**_claims(real), "scope": "catalog:read budget:read ledger:write"}
    forged = f"{h}.{_seg(claims)}.{s}"
    _refused_everywhere(flow, forged, real)


def test_rs256_header_on_an_es256_key_is_refused(flow: OAuthFlow, issued: dict[str, Any]) -> None:
    real = issued["access_token"]
    h = {**_header(real), "alg": "RS256"}
    _, p, s = real.split(".")
    forged = f"{_seg(h)}.{p}.{s}"
    _refused_everywhere(flow, forged, real)


def test_control_a_properly_signed_copy_registered_the_same_way_is_active(
    flow: OAuthFlow, issued: dict[str, Any]
) -> None:
    """The harness above is sound: the same re-signing and row registration, minus the defect, passes."""
    real = issued["access_token"]
    copy = _sign_raw({**_claims(real), "jti": secrets.token_urlsafe(16)})
    assert verify(copy, typ=SESSION_TOKEN_TYP, audience=CATALOG)["iss"] == ISSUER
    _as_issued(copy, real)
    assert flow.introspect(copy).json()["active"] is True

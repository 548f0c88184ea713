"""``consent.tokens.verify``'s ES256 path gives PyJWT's answers (RFC 7515 §5.2, RFC 7519 §7.2).

Tokens of the shape ``sign`` writes are checked by ``_verify_es256``; every other shape falls
through to ``_verify_generic`` (PyJWT). Each case below is a token, good or bad, put to both:
the same claims, or the same refusal in the same words.
"""

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from consent import tokens
from consent.conf import countersign_settings
from consent.keys import active_signing_key
from consent.tokens import ACTION_TOKEN_TYP, SESSION_TOKEN_TYP, TokenInvalid, sign, verify

pytestmark = pytest.mark.django_db

AUDIENCE = "http://ledger.test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": countersign_settings.ISSUER,
        "sub": "user:1",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 60,
        "jti": "j-1",
        "authorization_details": [{"type": "ledger_entry", "amount": "10.00"}],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def signed(payload: bytes, *, header: dict[str, Any] | None = None, key: Any = None) -> str:
    """A compact JWS over ``payload`` bytes with our active key (or ``key``), R || S."""
    active = active_signing_key()
    protected = b64(
        json.dumps(header or {"alg": "ES256", "kid": active.kid, "typ": ACTION_TOKEN_TYP}).encode()
    )
    signing_input = f"{protected}.{b64(payload)}".encode()
    private = key or active.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(private.sign(signing_input, tokens._ES256))
    return f"{signing_input.decode()}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def outcome(check: Callable[..., dict[str, Any]], token: str, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "claims", check(token, **kwargs)
    except TokenInvalid as exc:
        return "refused", str(exc)


def both(token: str, **kwargs: Any) -> tuple[str, Any]:
    """The fast path's answer, checked against PyJWT's."""
    kwargs.setdefault("typ", ACTION_TOKEN_TYP)
    kwargs.setdefault("audience", AUDIENCE)
    kwargs.setdefault("verify_exp", True)

    def fast(token: str, **kw: Any) -> dict[str, Any]:
        found = tokens._verify_es256(token, **kw)
        assert found is not None, "the ES256 path should have taken this token"
        return found

    generic = outcome(tokens._verify_generic, token, **kwargs)
    assert outcome(fast, token, **kwargs) == generic
    assert outcome(verify, token, **kwargs) == generic
    return generic


def test_tokens_sign_writes_take_the_es256_path_and_verify() -> None:
    token = sign(claims(), typ=ACTION_TOKEN_TYP)
    kind, found = both(token)
    assert kind == "claims" and found["jti"] == "j-1"
    assert both(token, audience=None)[0] == "claims"
    assert both(token, typ=SESSION_TOKEN_TYP) == (
        "refused",
        f"wrong token type (expected {SESSION_TOKEN_TYP})",
    )


@pytest.mark.parametrize(
    "changes, refusal",
    [
        ({"exp": int(time.time()) - 3600}, "token expired"),
        ({"iat": int(time.time()) + 3600}, "invalid token: The token is not yet valid (iat)"),
        ({"nbf": int(time.time()) + 3600}, "invalid token: The token is not yet valid (nbf)"),
        ({"nbf": "soon"}, "invalid token: Not Before claim (nbf) must be an integer."),
        ({"iat": "now"}, "invalid token: Issued At claim (iat) must be an integer."),
        ({"exp": [1]}, "invalid token: Expiration Time claim (exp) must be an integer."),
        ({"iss": "http://evil.test"}, "invalid token: Invalid issuer"),
        ({"iss": 7}, "invalid token: Payload Issuer (iss) must be a string"),
        ({"aud": "http://other.test"}, "invalid token: Audience doesn't match"),
        ({"aud": ["http://other.test", 3]}, "invalid token: Invalid claim format in token"),
        ({"aud": {"x": AUDIENCE}}, "invalid token: Invalid claim format in token"),
        ({"aud": ""}, 'invalid token: Token is missing the "aud" claim'),
        ({"sub": 1}, "invalid token: Subject must be a string"),
        ({"jti": 5}, "invalid token: JWT ID must be a string"),
        ({"jti": DROP}, 'invalid token: Token is missing the "jti" claim'),
        ({"iss": None}, 'invalid token: Token is missing the "iss" claim'),
        ({"aud": [AUDIENCE, "http://other.test"]}, None),
        ({"iat": "1700000000", "exp": str(int(time.time()) + 86400)}, None),  # parametrized at collection
        ({"nbf": int(time.time()) - 5}, None),
    ],
)
def test_claims_are_refused_in_pyjwts_words(changes: dict[str, Any], refusal: str | None) -> None:
    kind, found = both(signed(json.dumps(claims(**changes)).encode()))
    assert (kind, found if refusal else None) == ("refused" if refusal else "claims", refusal)


def test_an_expired_token_passes_when_expiry_is_not_checked() -> None:
    token = signed(json.dumps(claims(exp=int(time.time()) - 3600)).encode())
    assert both(token, verify_exp=False)[0] == "claims"


def test_forged_and_mangled_tokens_are_refused_alike() -> None:
    good = sign(claims(), typ=ACTION_TOKEN_TYP)
    header, payload, signature = good.split(".")
    other = ec.generate_private_key(ec.SECP256R1())
    tampered_payload = b64(json.dumps(claims(sub="user:2")).encode())
    cases = {
        "another key": signed(json.dumps(claims()).encode(), key=other),
        "payload swapped": f"{header}.{tampered_payload}.{signature}",
        "short signature": f"{header}.{payload}.{signature[:-8]}",
        "signature cut to a whole quantum": f"{header}.{payload}.{signature[:-6]}",
        "signature not base64url": f"{header}.{payload}.{signature[:-2]}!!",
        "payload not base64url": f"{header}.{payload[:-2]}*~.{signature}",
        "payload a list": signed(b"[1, 2]"),
        "payload not JSON": signed(b"{not json"),
        "unknown kid": signed(b"{}", header={"alg": "ES256", "kid": "nobody", "typ": ACTION_TOKEN_TYP}),
    }
    for name, token in cases.items():
        kind, found = both(token)
        assert kind == "refused", name
    assert both(cases["another key"])[1] == "invalid token: Signature verification failed"
    assert both(cases["unknown kid"])[1] == "unknown signing key"
    assert both(cases["payload not base64url"])[1] == "malformed token"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "==",  # padding: PyJWT accepts or refuses it
        lambda t: t.replace(".", "..", 1),  # four segments
        lambda t: t + ".x",
        lambda t: "é" + t,
    ],
)
def test_other_shapes_go_to_pyjwt(mangle: Callable[[str], str]) -> None:
    token = mangle(sign(claims(), typ=ACTION_TOKEN_TYP))
    assert tokens._verify_es256(token, typ=ACTION_TOKEN_TYP, audience=AUDIENCE, verify_exp=True) is None
    assert outcome(verify, token, typ=ACTION_TOKEN_TYP, audience=AUDIENCE) == outcome(
        tokens._verify_generic, token, typ=ACTION_TOKEN_TYP, audience=AUDIENCE, verify_exp=True
    )


def test_headers_beyond_alg_kid_typ_go_to_pyjwt() -> None:
    kid = active_signing_key().kid
    for header in (
        {"alg": "ES256", "kid": kid, "typ": ACTION_TOKEN_TYP, "crit": ["exp"]},
        {"alg": "ES256", "kid": kid, "typ": ACTION_TOKEN_TYP, "b64": False},
        {"alg": "none", "kid": kid, "typ": ACTION_TOKEN_TYP},
        {"alg": "HS256", "kid": kid, "typ": ACTION_TOKEN_TYP},
        {"alg": "ES256", "kid": 5, "typ": ACTION_TOKEN_TYP},
    ):
        token = signed(json.dumps(claims()).encode(), header=header)
        assert tokens._verify_es256(token, typ=ACTION_TOKEN_TYP, audience=AUDIENCE, verify_exp=True) is None
        kind, _ = outcome(verify, token, typ=ACTION_TOKEN_TYP, audience=AUDIENCE)
        assert kind == "refused", header


def test_claims_nested_past_the_bound_are_malformed_before_anything_parses_them() -> None:
    bound = countersign_settings.JWT_MAX_DEPTH
    body = json.dumps(claims(authorization_details=DROP))[:-1].encode()

    def nested(levels: int) -> str:  # the claims object itself is one level
        return signed(body + b', "x": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}")

    too_deep = nested(bound + 1)
    assert tokens._plain_header(too_deep.split(".")[0].encode()) is not None  # the ES256 path's to refuse
    assert outcome(verify, too_deep, typ=ACTION_TOKEN_TYP, audience=AUDIENCE) == (
        "refused",
        "malformed token",
    )
    assert outcome(verify, nested(bound), typ=ACTION_TOKEN_TYP, audience=AUDIENCE)[0] == "claims"

"""One error hierarchy: every refusal names its OAuth error and a stable, machine-readable reason."""

import json
import re

import approvals.errors  # noqa: F401  (its refusals are part of the hierarchy)
from consent.errors import InvalidClient, OAuthError
from consent.http import error_response


def _every_refusal() -> list[type[OAuthError]]:
    found, todo = [], [OAuthError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_refusal_has_a_snake_case_reason_and_a_docstring() -> None:
    for cls in _every_refusal():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", cls().reason_code), cls
        assert cls.__doc__, f"{cls.__name__}: say which spec section it answers"


def test_no_two_refusals_share_an_error_and_a_reason() -> None:
    # A client tells refusals apart by (error, reason): two classes with the same pair would be one.
    seen: dict[tuple[str, str], str] = {}
    for cls in _every_refusal():
        if "code" not in vars(cls) and cls is not OAuthError:
            continue  # inherits its parent's pair: a narrower type of the same refusal
        key = (cls().error, cls().reason_code)
        assert key not in seen, f"{cls.__name__} and {seen[key]} both answer {key}"
        seen[key] = cls.__name__


def test_the_body_carries_the_reason_and_a_401_its_challenge() -> None:
    response = error_response(InvalidClient("Client authentication failed.", reason="wrong secret"))
    body = json.loads(response.content)
    assert body == {
        "error": "invalid_client",
        "error_description": "Client authentication failed.",
        "reason": "client_authentication_failed",
    }
    assert "wrong secret" not in response.content.decode()  # the audit's detail is not the client's business
    assert response.status_code == 401 and 'error="invalid_client"' in response["WWW-Authenticate"]

"""``ProtocolJsonResponse`` answers exactly as ``JsonResponse`` would: status, headers and bytes."""

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.http import BadHeaderError, JsonResponse

from consent.http import NO_STORE, ProtocolJsonResponse

BODIES = [
    {"access_token": "eyJ.x.y", "token_type": "DPoP", "expires_in": 300, "scope": "a b"},
    {"error": "invalid_grant", "error_description": "Ünïcode «quoted» \u2028 text", "reason": "x"},
    {"at": datetime(2026, 12, 3, 12, 0, tzinfo=UTC), "id": uuid.UUID(int=7), "amount": Decimal("1.50")},
    {"nested": {"list": [1, 2.5, None, True, {"k": "v"}]}},
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("status", [200, 400, 401, 503])
@pytest.mark.parametrize("headers", [None, NO_STORE, {**NO_STORE, "DPoP-Nonce": "n-1"}])
def test_the_same_answer_as_json_response(
    body: dict[str, Any], status: int, headers: dict[str, str] | None
) -> None:
    ours, django = (
        ProtocolJsonResponse(body, status=status, headers=headers),
        JsonResponse(body, status=status, headers=headers),
    )
    assert ours.content == django.content
    assert ours.status_code == django.status_code and ours.reason_phrase == django.reason_phrase
    assert list(ours.items()) == list(django.items())
    assert ours.charset == django.charset
    ours["WWW-Authenticate"] = django["WWW-Authenticate"] = 'Basic realm="countersign"'
    assert ours.serialize() == django.serialize()


def test_bad_headers_are_refused_as_django_refuses_them() -> None:
    with pytest.raises(BadHeaderError):
        JsonResponse({}, headers={"X-Bad": "a\nb"})
    with pytest.raises(BadHeaderError):
        ProtocolJsonResponse({}, headers={"X-Bad": "a\nb"})

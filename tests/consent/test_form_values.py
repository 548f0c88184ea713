"""``consent.http.form_values``: what ``request.POST`` gives, single-valued, without a ``QueryDict``."""

import pytest
from django.core.exceptions import TooManyFieldsSent
from django.test import RequestFactory, override_settings

from consent.http import ProtocolView, form_values


def post(body: bytes, content_type: str = "application/x-www-form-urlencoded"):  # type: ignore[no-untyped-def]
    return RequestFactory().generic("POST", "/o/redeem/", data=body, content_type=content_type)


def test_the_last_of_a_repeated_name_as_query_dict_get() -> None:
    request = post(b"token=a&token=b&action_hash=&x=%C3%A9")
    assert form_values(request) == {"token": "b", "action_hash": "", "x": "é"}
    assert form_values(request) == post(b"token=a&token=b&action_hash=&x=%C3%A9").POST.dict()


def test_bad_bytes_decode_as_request_post_does() -> None:
    body = b"token=%FF%FE&raw=\xff"
    assert form_values(post(body)) == post(body).POST.dict()


def test_multipart_goes_through_request_post() -> None:
    factory = RequestFactory()
    request = factory.post("/o/redeem/", {"token": "t", "action_hash": "h"})  # multipart/form-data
    assert form_values(request) == {"token": "t", "action_hash": "h"}


@override_settings(DATA_UPLOAD_MAX_NUMBER_FIELDS=3)
def test_too_many_fields_is_refused_as_request_post_refuses_it() -> None:
    with pytest.raises(TooManyFieldsSent):
        form_values(post(b"a=1&b=2&c=3&d=4"))
    with pytest.raises(TooManyFieldsSent):
        post(b"a=1&b=2&c=3&d=4").POST  # noqa: B018 - the same refusal


def test_protocol_views_are_csrf_exempt_once() -> None:
    class Endpoint(ProtocolView):
        pass

    view = Endpoint.as_view()
    assert getattr(view, "csrf_exempt", False) is True

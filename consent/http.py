"""The one place protocol error responses are built (RFC 6749 §5.2, RFC 6750 §3)."""

import base64
import binascii
from collections.abc import Callable, Mapping
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus

import jwt
from django.conf import settings
from django.core.exceptions import TooManyFieldsSent
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.http.response import ResponseHeaders
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from consent.errors import OAuthError
from consent.limits.jsonbounds import JSONTooDeep, check_jwt

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    class AuthenticatedHttpRequest(HttpRequest):
        """A request that ``login_required`` let through: its user is signed in."""

        user: User

else:
    AuthenticatedHttpRequest = HttpRequest

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# JsonResponse's serialization (DjangoJSONEncoder, json.dumps' default separators), one encoder for all.
_ENCODER = DjangoJSONEncoder()
_JSON_TYPE = ("Content-Type", "application/json")
# Header sets protocol answers repeat (NO_STORE, the DPoP nonce of the window), as ResponseHeaders
# stores them once Django's header rules have passed them; bounded, as a nonce changes every window.
_CHECKED: dict[tuple[tuple[str, str], ...], dict[str, tuple[str, str]]] = {}
_CHECKED_MAX = 64


def _checked_headers(headers: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``headers`` as ``ResponseHeaders`` stores them, validated as its ``__setitem__`` does."""
    key = tuple(headers.items())
    store = _CHECKED.get(key)
    if store is None:
        store = ResponseHeaders(headers)._store  # raises BadHeaderError as any response would
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = store
    return store


class ProtocolJsonResponse(JsonResponse):
    """A ``JsonResponse`` built without its per-call set-up: the same status, headers and bytes.

    ``JsonResponse`` makes a new encoder per response, validates every header (the constant
    ``NO_STORE`` pair included) and reads ``DEFAULT_CHARSET`` from settings to encode its own
    ASCII JSON: ~131,000 instructions per protocol answer, 6 % of a code exchange (callgrind,
    ``bench/inprocess.py --instructions``). Here the encoder is shared (``DjangoJSONEncoder``,
    json.dumps' default separators), the constant header sets are checked once, and the body,
    ASCII by construction (``ensure_ascii``), is encoded without a charset lookup. Anything that
    reads or changes the response afterwards sees an ordinary ``JsonResponse``.
    """

    def __init__(
        self, data: dict[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        store = dict(_checked_headers(headers)) if headers else {}
        store.setdefault("content-type", _JSON_TYPE)  # after the given headers, as JsonResponse orders them
        self.headers = response_headers = ResponseHeaders({})
        response_headers._store = store
        self._charset = None
        self._resource_closers: list[Callable[[], object]] = []
        self._handler_class = None
        self.cookies = SimpleCookie()
        self.closed = False
        self.status_code = status
        self._reason_phrase = None
        self._container = [_ENCODER.encode(data).encode("ascii")]


def www_authenticate(error: str, description: str = "", *, scheme: str = "Basic") -> str:
    """A challenge naming the error (RFC 6750 §3 attribute syntax, RFC 6749 §5.2 for clients)."""
    value = f'{scheme} realm="countersign", error="{error}"'
    if description:
        value += ', error_description="{}"'.format(description.replace("\\", "").replace('"', "'"))
    return value


def oauth_error(
    error: str, description: str = "", *, status: int = 400, scheme: str = "Basic", reason: str = ""
) -> ProtocolJsonResponse:
    """Every 401 carries a WWW-Authenticate challenge with the same error and description.

    ``reason`` (``OAuthError.reason_code``; the ``error`` when not given) is the stable,
    machine-readable name of the refusal, beside RFC 6749 §5.2's members: clients decide on it.
    """
    body: dict[str, str] = {"error": error}
    if description:
        body["error_description"] = description
    body["reason"] = reason or error
    response = ProtocolJsonResponse(body, status=status, headers=NO_STORE)
    if status == 401:
        response["WWW-Authenticate"] = www_authenticate(error, description, scheme=scheme)
    return response


def error_response(exc: OAuthError, *, headers: dict[str, str] | None = None) -> ProtocolJsonResponse:
    """An ``OAuthError`` as its JSON response (RFC 6749 §5.2)."""
    response = oauth_error(
        exc.error, exc.description, status=exc.status_code, scheme=exc.scheme, reason=exc.reason_code
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def basic_credentials(header: str) -> tuple[str, str] | None:
    """Client id and secret of an HTTP Basic ``Authorization`` header (RFC 6749 §2.3.1), or None."""
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    return unquote_plus(client_id), unquote_plus(secret)


def client_credentials(request: HttpRequest) -> tuple[str, str] | None:
    """Client id and secret from HTTP Basic (RFC 6749 §2.3.1) or the form body."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header.startswith("Basic "):
        return basic_credentials(header)
    client_id, secret = request.POST.get("client_id"), request.POST.get("client_secret")
    if client_id and secret:
        return client_id, secret
    return None


def claimed_client_id(request: HttpRequest) -> str:
    """The client id a request claims (for audit rows and pre-checks; not proof of anything)."""
    creds = client_credentials(request)
    claimed = creds[0] if creds else request.POST.get("client_id") or request.GET.get("client_id", "")
    if not claimed and request.POST.get("client_assertion"):
        try:
            check_jwt(request.POST["client_assertion"])
            claimed = str(
                jwt.decode(request.POST["client_assertion"], options={"verify_signature": False}).get(
                    "iss", ""
                )
            )
        except (jwt.PyJWTError, JSONTooDeep):
            claimed = ""
    attestation = request.META.get("HTTP_OAUTH_CLIENT_ATTESTATION")
    if not claimed and isinstance(attestation, str) and len(attestation) <= 8192:
        try:
            check_jwt(attestation)
            claimed = str(jwt.decode(attestation, options={"verify_signature": False}).get("sub", ""))
        except (jwt.PyJWTError, JSONTooDeep):
            claimed = ""
    return claimed[:100]


FORM = "application/x-www-form-urlencoded"


def form_pairs(request: HttpRequest) -> list[tuple[str, str]]:
    """The (name, value) pairs of a form-encoded body, in order, as ``request.POST`` would decode
    them (UTF-8, a bad byte replaced; ``DATA_UPLOAD_MAX_MEMORY_SIZE`` through ``request.body``).

    Raises ``ValueError`` past ``DATA_UPLOAD_MAX_NUMBER_FIELDS``. Building Django's ``QueryDict``
    (a list per name, a mutability guard, an encoding check per value) was a tenth of the CPU of a
    redemption answered from memory (cProfile, ``bench/inprocess.py``).
    """
    body = request.body
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = body.decode("iso-8859-1")  # as Django's QueryDict
    return parse_qsl(
        text, keep_blank_values=True, errors="replace", max_num_fields=settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    )


def form_values(request: HttpRequest) -> dict[str, str]:
    """``request.POST`` as single values: the last of a repeated name, as ``QueryDict.get`` gives.

    A form-encoded body is parsed by ``form_pairs``, unless ``request.POST`` was read already;
    anything else (multipart) goes through ``request.POST`` as before. Past
    ``DATA_UPLOAD_MAX_NUMBER_FIELDS``, ``TooManyFieldsSent``, as ``request.POST`` raises it.
    """
    if request.content_type != FORM or hasattr(request, "_post"):
        return request.POST.dict()
    try:
        return dict(form_pairs(request))
    except ValueError as exc:
        raise TooManyFieldsSent(
            "The number of GET/POST parameters exceeded settings.DATA_UPLOAD_MAX_NUMBER_FIELDS."
        ) from exc


class ProtocolView(View):
    """A class-based protocol endpoint: clients authenticate in the request, so no CSRF check.

    ``csrf_exempt`` is applied once, to the view ``as_view`` returns; ``method_decorator`` on
    ``dispatch`` decorated the method again on every request (``functools.update_wrapper`` and
    a coroutine check each time, a twentieth of a redemption answered from memory).
    """

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Callable[..., HttpResponseBase]:
        return csrf_exempt(super().as_view(**initkwargs))

"""Django view decorators for resource servers (the only module here that imports Django).

.. code-block:: python

    # settings.py
    COUNTERSIGN_VERIFIER = {"issuer": "https://auth.example", "audience": "https://ledger.example",
                            "client_id": "...", "client_secret": "..."}

    @requires_scope("budget:read")
    def budget(request):
        return JsonResponse({"user": request.countersign.subject})

    @requires_action("ledger:write", details=lambda request: [json.loads(request.body)])
    def append(request): ...

Refusals are JSON (RFC 6749 §5.2 member names) with the RFC 6750 §3 / RFC 9449
§7.1 ``WWW-Authenticate`` challenge, naming the RFC 9728 metadata URL
(``urlpatterns += metadata_urlpatterns()`` serves it); on success ``request.countersign`` is the
:class:`~countersign.verifier.VerifiedToken`.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict, TypeVar, cast

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse

from .errors import CountersignError, InvalidRequest
from .resource_metadata import metadata_paths
from .verifier import TokenVerifier, VerifiedToken, parse_authorization, refusal

__all__ = [
    "get_verifier",
    "metadata_urlpatterns",
    "protected_resource_metadata",
    "requires_action",
    "requires_scope",
]

View = TypeVar("View", bound=Callable[..., Any])
DetailsFn = Callable[[HttpRequest], Sequence[Mapping[str, Any]]]

_built: dict[int, TokenVerifier] = {}
_built_lock = threading.Lock()


def get_verifier() -> TokenVerifier:
    """The verifier named by ``settings.COUNTERSIGN_VERIFIER``: a :class:`TokenVerifier`, or a
    dict of its keyword arguments (built once per process)."""
    configured = getattr(settings, "COUNTERSIGN_VERIFIER", None)
    if isinstance(configured, TokenVerifier):
        return configured
    if not isinstance(configured, Mapping):
        raise ImproperlyConfigured("COUNTERSIGN_VERIFIER must be a TokenVerifier or a dict of its arguments")
    with _built_lock:
        verifier = _built.get(id(configured))
        if verifier is None:
            options = dict(configured)
            verifier = _built[id(configured)] = TokenVerifier(options.pop("issuer"), **options)
        return verifier


def request_url(request: HttpRequest) -> str:
    """The URL a DPoP proof's ``htu`` must name (RFC 9449 §4.3): this request's, sans query."""
    return str(request.build_absolute_uri(request.path))


def _refuse(exc: CountersignError, verifier: TokenVerifier | None = None) -> HttpResponse:
    try:
        v = verifier or get_verifier()
    except ImproperlyConfigured:
        status, headers, body = refusal(exc)
    else:
        status, headers, body = v.refusal(exc)  # names the RFC 9728 metadata URL (§5.1)
    return JsonResponse(body, status=status, headers=headers)


def protected_resource_metadata(request: HttpRequest, verifier: TokenVerifier | None = None) -> HttpResponse:
    """RFC 9728 §3.2: this resource's metadata, from the verifier's configuration (public, GET only)."""
    if request.method not in ("GET", "HEAD"):
        return JsonResponse(
            {"error": "invalid_request", "error_description": "GET only"},
            status=405,
            headers={"Allow": "GET, HEAD"},
        )
    document = (verifier or get_verifier()).protected_resource_metadata()
    return JsonResponse(document, headers={"Cache-Control": "public, max-age=300"})


def metadata_urlpatterns(verifier: TokenVerifier | None = None) -> list[Any]:
    """URL patterns serving :func:`protected_resource_metadata` at both RFC 9728 §3.1 paths of the
    verifier's audience: ``urlpatterns += metadata_urlpatterns()``."""
    from django.urls import path

    v = verifier or get_verifier()
    return [
        path(p.lstrip("/"), functools.partial(protected_resource_metadata, verifier=v))
        for p in metadata_paths(v.audience)
    ]


class _Proof(TypedDict):
    """What the verifier needs to check a DPoP proof (RFC 9449 §4.3) beside the token."""

    dpop_proof: str | None
    htm: str
    htu: str
    scheme: str


def _verify(
    request: HttpRequest, verifier: TokenVerifier | None, *, scopes: Sequence[str], action: DetailsFn | None
) -> VerifiedToken:
    v = verifier or get_verifier()
    scheme, token = parse_authorization(request.headers.get("Authorization"))
    proof = request.headers.get("DPoP")
    dpop: _Proof = {
        "dpop_proof": proof,
        "htm": request.method or "GET",
        "htu": request_url(request),
        "scheme": scheme,
    }
    if action is None:
        return v.verify_session(token, required_scopes=scopes, **dpop)
    try:
        details = action(request)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(
            f"cannot tell which action this request performs ({type(exc).__name__})"
        ) from exc
    return v.verify_action(token, expected_details=details, required_scopes=scopes, redeem=True, **dpop)


def _decorate(
    view: View, verifier: TokenVerifier | None, scopes: Sequence[str], action: DetailsFn | None
) -> View:
    if inspect.iscoroutinefunction(view):
        check = sync_to_async(_verify, thread_sensitive=False)

        @functools.wraps(view)
        async def async_wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            try:
                verified = await check(request, verifier, scopes=scopes, action=action)
            except CountersignError as exc:
                return _refuse(exc, verifier)
            setattr(request, "countersign", verified)  # noqa: B010  (HttpRequest declares no such attribute)
            return await view(request, *args, **kwargs)

        return cast(View, async_wrapped)

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            verified = _verify(request, verifier, scopes=scopes, action=action)
        except CountersignError as exc:
            return _refuse(exc, verifier)
        setattr(request, "countersign", verified)  # noqa: B010  (HttpRequest declares no such attribute)
        return view(request, *args, **kwargs)

    return cast(View, wrapped)


def requires_scope(*scopes: str, verifier: TokenVerifier | None = None) -> Callable[[View], View]:
    """Require a valid session token (RFC 9068) carrying every one of ``scopes``."""

    def decorator(view: View) -> View:
        return _decorate(view, verifier, scopes, None)

    return decorator


def requires_action(
    scope: str, *, details: DetailsFn, verifier: TokenVerifier | None = None
) -> Callable[[View], View]:
    """Require a one-shot action token for ``scope`` approving exactly the action that
    ``details(request)`` describes (RFC 9396 ``authorization_details``), redeemed before the
    view runs, so the view's side effect happens at most once per approval."""

    def decorator(view: View) -> View:
        return _decorate(view, verifier, (scope,), details)

    return decorator

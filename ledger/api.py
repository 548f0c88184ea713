"""The ledger over HTTP: checkpoints for everyone, events and proofs for audit readers.

- ``GET /audit/checkpoints/`` (``?after=TREE_SIZE&limit=N``), ``/audit/checkpoints/latest``,
  ``/audit/checkpoints/<tree_size>``: public, like a Certificate Transparency log's signed tree
  heads (RFC 9162 §4.3): roots and sizes only, no event content.
- ``GET /audit/events/?cursor=SEQ&limit=N[&format=ocsf][&since=…&until=…&principal=…]``: the
  pull endpoint for log shippers; ``next_cursor`` is the last position returned.
- ``GET /audit/proofs/inclusion?event_id=ID[&tree_size=N]`` and
  ``/audit/proofs/consistency?first=N[&second=M]``: RFC 9162 §2.1.3 / §2.1.4 proofs as
  ``audit_prove`` prints them.
- ``GET /audit/proofs/approval?approval_id=ID[&tree_size=N]``: the inclusion proof of the
  event that approved an action, for the resource server the action's scope is addressed to
  (its own credentials, HTTP Basic), so it can check that what it executed is in the ledger.

Readers authenticate with ``Authorization: Bearer <token>`` (``manage.py audit_reader create``);
failures count against the source's ``audit_reader`` attempt limit (resource servers: their
``resource_server`` attempt limit). Every refusal is a JSON
error (RFC 6749 §5.2 members; RFC 6750 §3 challenge on 401), changes nothing, and is audited
(a flood of bad input from one source: the first per minute, the rest counted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, overload

from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from audit.export import ExportFilterError, document, ocsf, parse_when, sealed_events
from audit.ledger import checkpoint_document
from audit.models import AuditCheckpoint, AuditLink, AuditReader
from audit.proofs import ProofUnavailable, approval_decision_event, consistency_bundle, inclusion_bundle
from audit.readers import audit_reader_authenticate
from audit.services import audit_refusal, client_ip
from consent.conf import countersign_settings
from consent.errors import InvalidClient, InvalidRequest, MethodNotAllowed, NotFound, OAuthError
from consent.http import error_response
from consent.limits import attempts, store

if TYPE_CHECKING:
    from consent.models import ResourceServer

PUBLIC = {"Cache-Control": "public, max-age=5"}
KIND = "audit_reader"


# The audit endpoints' refusals: the protocol hierarchy's, rendered by consent.http.error_response.


class AuditRequestInvalid(InvalidRequest):
    """RFC 6749 §5.2, as these endpoints answer it: a parameter is unknown, repeated or out of range."""


class ReaderTokenInvalid(OAuthError):
    """RFC 6750 §3.1: the audit reader token is missing, or not one an admin issued (or it was revoked)."""

    error = "invalid_token"
    status_code = 401
    scheme = "Bearer"


class AuthenticationLocked(OAuthError):
    """RFC 6585 §4: too many failed authentications from this source; nothing is checked until it ends."""

    error = "too_many_requests"
    status_code = 429


def _refuse(
    request: HttpRequest, exc: OAuthError, *, event: str, actor: str = "", dedupe: bool = True
) -> JsonResponse:
    source = client_ip(request)
    if not dedupe or store.first_refusal(f"{event}:{source}", field=event, window=60):
        audit_refusal(
            event=event,
            error=exc.error,
            actor=actor,
            request=request,
            detail={"path": request.path[:200], "reason": exc.description[:200]},
        )
    response = error_response(exc)
    if exc.status_code == 405:
        response["Allow"] = "GET, HEAD"
    return response


@overload
def _int(request: HttpRequest, name: str, *, default: int, low: int, high: int | None = None) -> int: ...


@overload
def _int(
    request: HttpRequest, name: str, *, default: None, low: int, high: int | None = None
) -> int | None: ...


def _int(
    request: HttpRequest, name: str, *, default: int | None, low: int, high: int | None = None
) -> int | None:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise AuditRequestInvalid(f"{name} must be a non-negative integer")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise AuditRequestInvalid(
            f"{name} must be between {low} and {high}" if high else f"{name} must be at least {low}"
        )
    return value


def _known(request: HttpRequest, allowed: set[str]) -> None:
    unknown = sorted(set(request.GET) - allowed)
    if unknown:
        raise AuditRequestInvalid(f"unknown parameter {unknown[0][:40]!r}")
    for name in request.GET:
        if len(request.GET.getlist(name)) > 1:
            raise AuditRequestInvalid(f"{name} given more than once")


def _get_only(request: HttpRequest) -> None:
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("use GET")


# --- public: checkpoints ---------------------------------------------------------------------------


@csrf_exempt  # machine endpoints, GET only: other methods get a JSON 405
def checkpoints_view(request: HttpRequest) -> HttpResponse:
    try:
        _get_only(request)
        _known(request, {"after", "limit"})
        after = _int(request, "after", default=0, low=0)
        limit = _int(request, "limit", default=100, low=1, high=1000)
    except OAuthError as exc:
        return _refuse(request, exc, event="audit.checkpoints_refused")
    rows = list(AuditCheckpoint.objects.filter(tree_size__gt=after).order_by("tree_size")[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    return JsonResponse(
        {
            "checkpoints": [checkpoint_document(cp) for cp in rows],
            "next": rows[-1].tree_size if more else None,
        },
        headers=PUBLIC,
    )


@csrf_exempt  # machine endpoints, GET only: other methods get a JSON 405
def checkpoint_view(request: HttpRequest, tree_size: str) -> HttpResponse:
    try:
        _get_only(request)
        _known(request, set())
        if tree_size == "latest":
            cp = AuditCheckpoint.objects.order_by("-tree_size").first()
        elif tree_size.isdigit() and len(tree_size) <= 18:
            cp = AuditCheckpoint.objects.filter(tree_size=int(tree_size)).first()
        else:
            raise AuditRequestInvalid("a checkpoint is named by its tree size, or latest")
        if cp is None:
            raise NotFound("no such checkpoint" if tree_size != "latest" else "no checkpoint signed yet")
    except OAuthError as exc:
        return _refuse(request, exc, event="audit.checkpoints_refused")
    return JsonResponse(checkpoint_document(cp), headers=PUBLIC)


# --- audit readers: events and proofs -------------------------------------------------------------


def _reader(request: HttpRequest) -> AuditReader:
    """The authenticated reader, or raises the 401 / 429 to send."""
    keys = attempts.keys_for(account="", source=client_ip(request))
    if KIND in countersign_settings.ATTEMPT_LIMITS:
        locked = attempts.locked(KIND, keys)
        if locked:
            attempts.refused_while_locked(KIND, keys)
            raise AuthenticationLocked(attempts.message(locked))
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    reader = audit_reader_authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if reader is None:
        if KIND in countersign_settings.ATTEMPT_LIMITS:
            attempts.failed(KIND, keys, request=request)
        raise ReaderTokenInvalid("an audit reader token is required (Authorization: Bearer)")
    return reader


def _reader_endpoint(
    request: HttpRequest, event: str, allowed: set[str], build: Callable[[HttpRequest], dict[str, Any]]
) -> JsonResponse:
    try:
        _get_only(request)
        reader = _reader(request)
    except OAuthError as exc:
        return _refuse(request, exc, event=event, dedupe=exc.status_code != 401)
    actor = f"audit_reader:{reader.name}"
    try:
        _known(request, allowed)
        body = build(request)
    except OAuthError as exc:
        return _refuse(request, exc, event=event, actor=actor, dedupe=False)
    except (ExportFilterError, ProofUnavailable) as exc:
        refusal = NotFound(str(exc)) if isinstance(exc, ProofUnavailable) else AuditRequestInvalid(str(exc))
        return _refuse(request, refusal, event=event, actor=actor, dedupe=False)
    return JsonResponse(body, headers={"Cache-Control": "no-store"})


def _events(request: HttpRequest) -> dict[str, Any]:
    cursor = _int(request, "cursor", default=0, low=0)
    limit = _int(request, "limit", default=100, low=1, high=countersign_settings.AUDIT_EXPORT_PAGE_MAX)
    fmt = request.GET.get("format", "countersign")
    if fmt not in ("countersign", "ocsf"):
        raise AuditRequestInvalid("format must be countersign or ocsf")
    since, until = request.GET.get("since"), request.GET.get("until")
    links: QuerySet[AuditLink] = sealed_events(
        after=cursor,
        principal=request.GET.get("principal") or None,
        since=parse_when(since, name="since") if since else None,
        until=parse_when(until, name="until", end=True) if until else None,
    )
    page = list(links[: limit + 1])
    more = len(page) > limit
    docs = [document(link) for link in page[:limit]]
    newest = AuditCheckpoint.objects.order_by("-tree_size").values_list("tree_size", flat=True).first()
    return {
        "schema": "countersign.audit.v1" if fmt == "countersign" else "ocsf-1.3.0",
        "events": docs if fmt == "countersign" else [ocsf(d) for d in docs],
        "next_cursor": str(docs[-1]["seq"] if docs else cursor),
        "more": more,
        "tree_size": newest or 0,
    }


@csrf_exempt  # machine endpoints, GET only: other methods get a JSON 405
def events_view(request: HttpRequest) -> HttpResponse:
    return _reader_endpoint(
        request, "audit.export_refused", {"cursor", "limit", "format", "since", "until", "principal"}, _events
    )


@csrf_exempt  # machine endpoints, GET only: other methods get a JSON 405
def inclusion_view(request: HttpRequest) -> HttpResponse:
    def build(request: HttpRequest) -> dict[str, Any]:
        event_id = _int(request, "event_id", default=None, low=1)
        if event_id is None:
            raise AuditRequestInvalid("event_id is required")
        return inclusion_bundle(event_id=event_id, tree_size=_int(request, "tree_size", default=None, low=1))

    return _reader_endpoint(request, "audit.proof_refused", {"event_id", "tree_size"}, build)


@csrf_exempt  # machine endpoints, GET only: other methods get a JSON 405
def consistency_view(request: HttpRequest) -> HttpResponse:
    def build(request: HttpRequest) -> dict[str, Any]:
        first = _int(request, "first", default=None, low=1)
        if first is None:
            raise AuditRequestInvalid("first is required")
        return consistency_bundle(first=first, second=_int(request, "second", default=None, low=1))

    return _reader_endpoint(request, "audit.proof_refused", {"first", "second"}, build)


def _resource_server(request: HttpRequest) -> ResourceServer:
    """The resource server presenting its credentials, or raises the 401 / 429 to send."""
    from consent.http import client_credentials
    from consent.selectors import resource_server_authenticate

    creds = client_credentials(request)
    keys = attempts.keys_for(account=creds[0] if creds else "", source=client_ip(request))
    locked = attempts.locked("resource_server", keys)
    if locked:
        attempts.refused_while_locked("resource_server", keys)
        raise AuthenticationLocked(attempts.message(locked))
    rs = resource_server_authenticate(client_id=creds[0], secret=creds[1]) if creds else None
    if rs is None:
        attempts.failed("resource_server", keys, request=request, client_id=keys.get("account", ""))
        raise InvalidClient("resource-server authentication failed")
    return rs


@csrf_exempt  # machine endpoints, GET only: other methods get a JSON 405
def approval_proof_view(request: HttpRequest) -> HttpResponse:
    event = "audit.proof_refused"
    try:
        _get_only(request)
        rs = _resource_server(request)
    except OAuthError as exc:
        return _refuse(request, exc, event=event, dedupe=exc.status_code != 401)
    actor = f"rs:{rs.client_id}"
    try:
        _known(request, {"approval_id", "tree_size"})
        body = _approval_proof(request, rs)
    except OAuthError as exc:
        return _refuse(request, exc, event=event, actor=actor, dedupe=False)
    except ProofUnavailable as exc:
        return _refuse(request, NotFound(str(exc)), event=event, actor=actor, dedupe=False)
    return JsonResponse(body, headers={"Cache-Control": "no-store"})


def _approval_proof(request: HttpRequest, rs: ResourceServer) -> dict[str, Any]:
    import uuid

    from approvals.models import ApprovalRequest
    from consent.models import ScopePolicy

    try:
        approval_id = uuid.UUID(request.GET.get("approval_id", ""))
    except ValueError:
        raise AuditRequestInvalid("approval_id must be an approval's id (a UUID)") from None
    approval = ApprovalRequest.objects.filter(pk=approval_id).first()
    audience = (
        ScopePolicy.objects.filter(name=approval.scope).values_list("audience", flat=True).first()
        if approval
        else None
    )
    if approval is None or audience != rs.audience:  # another system's approvals do not exist for this one
        raise ProofUnavailable(f"no approval {approval_id} for {rs.audience}")
    event_id = approval_decision_event(approval_id=str(approval.pk), grant_id=str(approval.grant_id))
    return inclusion_bundle(event_id=event_id, tree_size=_int(request, "tree_size", default=None, low=1))

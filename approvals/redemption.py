"""Redemption: the resource server spends an action token, exactly once.

The resource server has verified the token locally and recomputed ``action_hash`` from the
request it is about to execute; ``action_token_verify`` checks the same here (RFC 8725 §3.11:
only an ``action+jwt``, for this audience), and ``action_token_redeem`` takes the ``redeem``
edge of the approval state graph (``ApprovalRequest.EDGES``): ISSUED -> REDEEMED, decided by one
conditional ``UPDATE ... RETURNING`` that also checks the grant, the agent (and the agent
instance that asked, ``consent.instances``) and the resource server are still live.

The signature of an attempt that reaches the database is checked by the token's digest: collection
records ``token_checksum`` (SHA-256 of the token as minted) with the token's row, and the redeeming
statement requires it (``_RECORDED``), so the claims it acts on are the very bytes we signed; a
token it does not find so (forged, or minted before digests were recorded) is verified as before
(``_verify_and_redeem``).

``action_token_spend`` is what the endpoint calls: the two steps, plus what makes the losers of
a race cheap. A redemption never goes back, so an attempt that repeats one this process has just
seen redeemed (the same token, resource server credentials and ``action_hash``) is refused
without verifying the token again or asking the database; attempts that arrive while the same
one is being decided wait for its outcome instead of queueing on the request's row lock.
"""

import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connection, transaction
from django.utils import timezone

from audit.services import PendingEvent, audit_event
from consent import rows
from consent.errors import InvalidClient, OAuthError
from consent.models import Agent, AgentInstance, ResourceServer, SessionGrant
from consent.selectors import RS_CURRENT as _RS_CURRENT
from consent.selectors import forget_resource_server, rs_current_params
from consent.tokens import ACTION_TOKEN_TYP, TokenInvalid, recorded_claims, token_checksum, verify

from . import rar
from .budgets import SPEND_CTE, budget_spend, spend_params
from .errors import (
    ActionHashMismatch,
    ActionMismatch,
    ActionTokenExpired,
    AgentSuspended,
    AlreadyRedeemed,
    ApprovalNotRedeemable,
    InvalidRequest,
    InvalidTarget,
    InvalidToken,
    RedeemGrantInactive,
    RedeemInstanceCutOff,
    UnknownActionToken,
)
from .models import ActionToken, ApprovalRequest

Status = ApprovalRequest.Status
_APPROVAL = rows.table(ApprovalRequest)


_TOKEN = rows.table(ActionToken)
_JOINED = (
    f" {_APPROVAL} ap, {rows.table(SessionGrant)} g, {rows.table(Agent)} ag WHERE ap.id = t.approval_id"
    f" AND g.id = ap.grant_id AND ag.id = ap.agent_id"
)
# The agent instance that asked was cut off (never true for an agent that runs as one: instance "").
_CUT_OFF = (
    f"EXISTS (SELECT 1 FROM {rows.table(AgentInstance)} i WHERE i.grant_id = ap.grant_id"
    f" AND i.instance_id = ap.instance AND i.status = %s)"
)
# The token presented is the one minted for this jti: its digest is the recorded one (params: the
# digest, then True when its signature was verified instead; the row of a token minted before digests
# were recorded holds "", which no digest equals).
_RECORDED = "(t.token_checksum = %s OR %s)"
# The winning UPDATE: unredeemed, unexpired, ISSUED, live grant, active agent (and instance), same resource server.
_WIN = (
    f"UPDATE {_TOKEN} AS t SET redeemed_at = %s, redeemed_by_id = %s FROM{_JOINED}"
    f" AND t.jti = %s AND {_RECORDED} AND t.redeemed_at IS NULL AND t.expires_at > %s AND ap.status = %s"
    f" AND g.status = %s"
    f" AND g.expires_at > %s AND ag.status = %s AND NOT {_CUT_OFF} AND {_RS_CURRENT} RETURNING approval_id"
)
_MOVE = f"UPDATE {_APPROVAL} SET status = %s WHERE id = %s AND status = %s"
# The redeem edge leaves one state, so its statements compare with "=" (ApprovalRequest.EDGES).
(_REDEEMABLE,) = ApprovalRequest.leaving("redeem")
_REDEEMED = ApprovalRequest.entering("redeem")
# Why an attempt did not win (read in the same statement on PostgreSQL, after it elsewhere).
_WHY = (
    f"t.redeemed_at IS NOT NULL, CASE WHEN t.expires_at <= %s THEN 1 ELSE 0 END, ap.status, g.status,"
    f" CASE WHEN g.expires_at <= %s THEN 1 ELSE 0 END, ag.status, {_RS_CURRENT}, {_CUT_OFF}, {_RECORDED}"
    f" FROM {_TOKEN} t,{_JOINED} AND t.jti = %s"
)


def _redeem_refusal(why: tuple[Any, ...] | None) -> OAuthError:
    if why is None:
        return UnknownActionToken("unknown action token")
    redeemed, expired, approval_status, grant_status, grant_ended, agent_status, rs_current, cut_off, _ = why
    if not rs_current:
        return InvalidClient(
            "Resource-server authentication failed.",
            reason="resource server deactivated or its secret changed since it was verified",
        )
    if grant_status != SessionGrant.Status.ACTIVE or grant_ended:
        return RedeemGrantInactive("the session grant is no longer active")
    if agent_status != Agent.Status.ACTIVE:
        return AgentSuspended("the agent is suspended")
    if cut_off:
        return RedeemInstanceCutOff("the agent instance that asked for this action was cut off")
    if expired and not redeemed:
        return ActionTokenExpired("action token expired")
    if approval_status not in (Status.ISSUED, Status.REDEEMED):
        return ApprovalNotRedeemable(f"the approval is {approval_status}")
    # Redeemed: before this statement began, or by the one it waited for.
    return AlreadyRedeemed("action token already redeemed")


# PostgreSQL: the request is found from the token and locked first, while it is still ISSUED
# (``held``: the statement's other joins are by primary key from that one row), so a concurrent
# cancel either waits for the redemption or ends the request first (and nothing wins);
# ISSUED -> REDEEMED then always moves with the token, in the same statement. Written so because
# the planner otherwise chose the join order from statistics: on those of a young database (a
# few grants, no tokens yet) it scanned every active grant per redemption, and under
# bench/load.py the redemption was 30 % of PostgreSQL's CPU (per-backend /proc CPU by statement).
_HELD = (
    f"held AS MATERIALIZED (SELECT la.id, la.status, la.grant_id, la.agent_id, la.instance FROM {_APPROVAL} la"
    f" WHERE la.id = (SELECT lt.approval_id FROM {_TOKEN} lt WHERE lt.jti = %s) AND la.status = %s"
    " FOR UPDATE OF la)"
)
_WIN_HOLDING = _WIN.replace(f" FROM {_APPROVAL} ap,", " FROM held ap,", 1)


@cache
def _redeem_sql(audit_sql: str) -> str:
    """The one statement of a redemption on PostgreSQL, around the audit event's CTE body."""
    return (
        f"WITH {_HELD}, won AS ({_WIN_HOLDING}),"
        f" moved AS (UPDATE {_APPROVAL} m SET status = %s FROM won"
        f" WHERE m.id = won.approval_id AND m.status = %s RETURNING m.id), spent AS ({SPEND_CTE}),"
        f" written AS ({audit_sql})"
        f" SELECT (SELECT approval_id FROM won), (SELECT COUNT(*) FROM moved), {_WHY}"
    )


def _redeem_statement(
    *, jti: str, digest: str | None, resource_server: ResourceServer, now: datetime, event: PendingEvent
) -> tuple[Any, int, tuple[Any, ...] | None]:
    """(approval id or None, requests moved ISSUED -> REDEEMED, why it lost).

    ``digest``: the token's ``token_checksum``, which must be the recorded one (``_RECORDED``);
    None once its signature was verified.

    On PostgreSQL one statement, outside any transaction: it redeems, moves the request,
    writes ``event`` (the winner's audit row), or reads why it lost. Elsewhere the same steps
    run one after another in the caller's transaction.
    """
    at = rows.param(ActionToken, "redeemed_at", now)
    grant_at = rows.param(SessionGrant, "expires_at", now)
    rs = rs_current_params(resource_server)
    cut = AgentInstance.Status.CUT_OFF
    recorded = [digest or "", digest is None]
    win = [
        at,
        resource_server.pk,
        jti,
        *recorded,
        at,
        _REDEEMABLE,
        SessionGrant.Status.ACTIVE,
        grant_at,
        Agent.Status.ACTIVE,
        cut,
        *rs,
    ]
    why = [at, grant_at, *rs, cut, *recorded, jti]
    if connection.vendor == "postgresql":
        audit_sql, audit_params = rows.event_insert(event, "moved")
        row = rows.fetchone(
            _redeem_sql(audit_sql),
            [jti, _REDEEMABLE, *win, _REDEEMED, _REDEEMABLE, *spend_params(now), *audit_params, *why],
        )
        if row is None:
            return None, 0, None
        return row[0], row[1], tuple(row[2:])
    won = rows.fetchone(_WIN, win)
    if won is None:
        return None, 0, rows.fetchone(f"SELECT {_WHY}", why)
    moved = rows.execute(_MOVE, [_REDEEMED, won[0], _REDEEMABLE])
    if moved == 1:
        budget_spend(approval_id=won[0], now=now)  # the amount a budget approval reserved is spent
        event.append()
    return won[0], moved, None


def action_token_verify(
    *, token: str, resource_server: ResourceServer, request_hash: str = ""
) -> dict[str, Any]:
    """Verify an action token for redemption by this resource server; the claims, or ``OAuthError``.

    RFC 8725 §3.11: only an ``action+jwt``. ``request_hash`` is the action hash the
    resource server recomputed from the request it is about to execute (it must be
    the approved one).
    """
    if not token:
        raise InvalidRequest("the token parameter is required")
    try:
        claims = verify(token, typ=ACTION_TOKEN_TYP)
    except TokenInvalid as exc:
        raise InvalidToken(str(exc)) from exc
    _check_action(claims, resource_server=resource_server, request_hash=request_hash)
    return claims


def _check_action(claims: dict[str, Any], *, resource_server: ResourceServer, request_hash: str) -> None:
    """The checks after the signature's: this resource server's audience, an ``action_hash`` that is
    the token's own ``authorization_details``, and the one the resource server recomputed."""
    if claims.get("aud") != resource_server.audience:
        raise InvalidTarget("this action token is for another resource server")
    if claims.get("action_hash") != rar.action_hash(claims.get("authorization_details") or []):
        raise ActionHashMismatch("action_hash does not match the token's authorization_details")
    if request_hash and request_hash != claims["action_hash"]:
        raise ActionMismatch(
            "the action you are about to execute is not the approved one (action_hash differs)"
        )


class NotRecorded(Exception):
    """No action token with these exact bytes was minted: its signature has to decide (not a refusal)."""


def action_token_redeem(
    *, claims: dict[str, Any], resource_server: ResourceServer, digest: str | None = None
) -> ApprovalRequest:
    """Mark the action token redeemed: exactly one caller ever wins.

    ``claims`` come from a verified ``action+jwt`` whose audience is this resource
    server, or (``digest``, its ``token_checksum``) from one whose signature was not checked:
    then the statement also requires the digest recorded when it was minted, and raises
    ``NotRecorded`` when no token of that ``jti`` has it. One conditional UPDATE decides,
    and checks in the same statement that the request is ISSUED, its grant and agent are
    still active, and the resource server is still active with the credentials it was
    verified with; the winner's request moves ISSUED -> REDEEMED with it and its audit row
    is written, all in that one statement on PostgreSQL. A losing attempt costs the same one statement (which reads why
    it lost); its refusal is audited by the endpoint.
    """
    now = timezone.now()
    jti = claims["jti"]
    if "approval_id" not in claims:  # every action token we mint names its request
        raise UnknownActionToken("unknown action token")
    grant_id = UUID(claims["grant_id"])
    user_id = int(claims["sub"].split(":", 1)[1])
    event = audit_event(
        event="action_token.redeemed",
        actor=f"rs:{resource_server.client_id}",
        user_id=user_id,
        client_id=claims["client_id"],
        grant_id=grant_id,
        detail={"approval_id": claims["approval_id"], "scope": claims["scope"], "jti": jti},
        announce=digest is None,  # whose it is, once the statement proved the claims ours
    )
    with transaction.atomic() if connection.vendor != "postgresql" else nullcontext():
        won, moved, why = _redeem_statement(
            jti=jti, digest=digest, resource_server=resource_server, now=now, event=event
        )
        if won is None:
            if digest is not None and (why is None or not why[-1]):
                raise NotRecorded(jti)
            refusal = _redeem_refusal(why)
            if isinstance(refusal, InvalidClient):
                forget_resource_server(resource_server.client_id)
            raise refusal
        if moved != 1:  # only without row locks; inside the transaction, this rolls the redemption back
            raise InvalidToken("the approval changed while it was redeemed")
    if digest is not None:
        event.announce()
    # The winner's request as the statement left it, from what the token says of it; the other
    # columns are deferred (read on access). Only the winner builds one: Model.__init__ over every
    # field, defaults included, had been a twelfth of a race's web CPU (py-spy), losers included.
    return _redeemed_request(
        {
            "id": UUID(claims["approval_id"]),
            "status": Status.REDEEMED,
            "scope": claims["scope"],
            "grant_id": grant_id,
            "user_id": user_id,
            "authorization_details": claims["authorization_details"],
            "action_hash": claims["action_hash"],
        },
        redeemed_at=now,  # what the statement stored, for the receipt
    )


_REQUEST_COLUMNS = [f.attname for f in ApprovalRequest._meta.concrete_fields]


def _redeemed_request(values: dict[str, Any], *, redeemed_at: datetime) -> ApprovalRequest:
    present = [name for name in _REQUEST_COLUMNS if name in values]
    approval = ApprovalRequest.from_db(DEFAULT_DB_ALIAS, present, [values[name] for name in present])
    approval.redeemed_at = redeemed_at
    return approval


# --- the losers of a race ---------------------------------------------------------------------------

# (token, resource server id, its credential, action_hash the resource server sent)
_Attempt = tuple[str, Any, str, str]
# How long this process answers a repeated attempt from memory. A race's attempts arrive within
# milliseconds of each other; a refusal that a later change would word differently (the grant
# revoked after the redemption: "grant_inactive") is worded as the database would within this long.
SPENT_SECONDS = 2.0
SPENT_MAX = 4096
# The longest an attempt waits for the same attempt already being decided before deciding itself.
FLIGHT_WAIT_SECONDS = 5.0


class _Spent:
    """Attempts this process saw end in a redemption in the last ``SPENT_SECONDS``: their claims."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[_Attempt, tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, attempt: _Attempt) -> dict[str, Any] | None:
        with self._lock:
            seen = self._seen.get(attempt)
        if seen is None or seen[0] <= time.monotonic():
            return None
        return seen[1]

    def add(self, attempt: _Attempt, claims: dict[str, Any]) -> None:
        # Never past the token's own expiry: from then on the token is refused as expired.
        until = time.monotonic() + min(SPENT_SECONDS, float(claims.get("exp", 0)) - time.time())
        with self._lock:
            self._seen[attempt] = (until, claims)
            self._seen.move_to_end(attempt)
            while len(self._seen) > SPENT_MAX:
                self._seen.popitem(last=False)


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    won: dict[str, Any] | None = None  # the claims, once the token is known to be redeemed


class _Flights:
    """Attempts being decided right now, so that the same attempt again waits for the outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flying: dict[_Attempt, _Flight] = {}

    def join(self, attempt: _Attempt) -> tuple[_Flight, bool]:
        """The flight for this attempt, and whether the caller leads it (decides it)."""
        with self._lock:
            flight = self._flying.get(attempt)
            if flight is not None:
                return flight, False
            flight = self._flying[attempt] = _Flight()
            return flight, True

    def land(self, attempt: _Attempt, flight: _Flight) -> None:
        with self._lock:
            self._flying.pop(attempt, None)
        flight.done.set()


_SPENT = _Spent()
_FLIGHTS = _Flights()


def _known_redeemed(attempt: _Attempt, flight: _Flight | None, claims: dict[str, Any]) -> None:
    """The token of ``attempt`` is redeemed: answer repeats from memory, and the twins waiting now."""
    _SPENT.add(attempt, dict(claims))
    if flight is not None:
        flight.won = dict(claims)


def _verify_and_redeem(
    *, token: str, resource_server: ResourceServer, request_hash: str, claims: dict[str, Any]
) -> ApprovalRequest:
    """``action_token_verify`` then ``action_token_redeem``, the signature left to the token's digest.

    A token of ours is proven by its ``token_checksum`` matching the one recorded when it was
    minted, inside the redemption's own statement (``consent.tokens.recorded_claims``): the
    P-256 verification was a third of the CPU of every attempt the database decides (callgrind,
    ``bench/inprocess.py``). Whatever that path does not answer for certain (a token not shaped
    as we mint them, a claim ``action_token_verify`` would refuse, no row with this digest: forged,
    or minted before digests were recorded) goes through the verification as before, which gives
    the same answer in the same words. ``claims`` is filled only with claims known to be ours.
    """
    recorded = recorded_claims(token, typ=ACTION_TOKEN_TYP)
    if recorded is not None and _acceptable(
        recorded, resource_server=resource_server, request_hash=request_hash
    ):
        try:
            approval = action_token_redeem(
                claims=recorded, resource_server=resource_server, digest=token_checksum(token)
            )
        except NotRecorded:
            pass  # not a token we recorded: its signature decides, below
        except OAuthError:
            claims.update(recorded)  # refused by the statement that matched its digest: it is ours
            raise
        else:
            claims.update(recorded)
            return approval
    claims.update(
        action_token_verify(token=token, resource_server=resource_server, request_hash=request_hash)
    )
    return action_token_redeem(claims=claims, resource_server=resource_server)


def _acceptable(claims: dict[str, Any], *, resource_server: ResourceServer, request_hash: str) -> bool:
    """Whether ``action_token_verify`` would accept these claims (``_check_action``), and they name a
    request, a user and a grant as every action token we mint does (``action_token_redeem`` reads them)."""
    try:
        _check_action(claims, resource_server=resource_server, request_hash=request_hash)
        return (
            "approval_id" in claims
            and isinstance(claims.get("sub"), str)
            and claims["sub"].startswith("user:")
            and claims["sub"][5:].isdigit()
            and UUID(claims["grant_id"]) is not None
            and UUID(claims["approval_id"]) is not None
        )
    except (OAuthError, KeyError, TypeError, ValueError, AttributeError):
        return False


def action_token_spend(
    *, token: str, resource_server: ResourceServer, request_hash: str, claims: dict[str, Any]
) -> ApprovalRequest:
    """Verify and redeem an action token for this resource server (the redemption endpoint).

    ``claims`` receives the token's verified claims as soon as they are known, so the endpoint's
    refusal audit can name whose token it was. Raises the ``OAuthError`` of the refusal.

    Exactly-once is still decided by ``action_token_redeem``'s one statement; what is added here
    only ever refuses, and only what that statement would refuse as already redeemed: an attempt
    this process saw redeemed (``_SPENT``), or one that arrived while the same attempt was being
    decided and that attempt found the token redeemed (``_FLIGHTS``). An attempt whose twin was
    refused for another reason, or did not decide in time, decides on its own.
    """
    attempt: _Attempt = (token, resource_server.pk, resource_server.client_secret, request_hash)
    seen = _SPENT.get(attempt)
    flight, leads = (None, False) if seen is not None else _FLIGHTS.join(attempt)
    if flight is not None and not leads and flight.done.wait(FLIGHT_WAIT_SECONDS):
        seen = flight.won
    if seen is not None:
        claims.update(seen)
        raise AlreadyRedeemed("action token already redeemed")
    try:
        approval = _verify_and_redeem(
            token=token, resource_server=resource_server, request_hash=request_hash, claims=claims
        )
    except AlreadyRedeemed:  # redeemed before, perhaps through another process: the same answer for the twins
        _known_redeemed(attempt, flight, claims)
        raise
    else:
        _known_redeemed(attempt, flight, claims)
        return approval
    finally:
        if leads and flight is not None:
            _FLIGHTS.land(attempt, flight)

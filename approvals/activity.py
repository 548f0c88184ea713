"""The activity page's sentences: each audit event told with names, not identifiers.

"Procurement Agent wrote 4250.00 USD to Financial management log, approved by you with password
and code from an authenticator app." The names (agents, resource servers, requests) are read in
bulk for one page, a few statements whatever its length.
"""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Q

from consent.budget import money
from consent.instances import short_instance
from consent.models import Agent, ResourceServer, ScopePolicy

from .models import ApprovalRequest
from .wording import auth_words

END_REASONS = {
    "revoked_by_user": "you revoked it",
    "revoked_by_agent": "the agent ended it",
    "revoked_by_admin": "an administrator ended it",
    "agent_suspended": "the agent was suspended",
    "refresh_token_reused": "a used refresh token was presented again, so it was ended to be safe",
    "authorization_code_reused": "a used authorization code was presented again, so it was ended to be safe",
    "lifetime_ended": "its lifetime ended",
    "grant_ended": "the connection ended",
    "instance_cut_off": "the instance of the agent that asked was cut off",
}


@dataclass
class Entry:
    id: int
    when: datetime
    sentence: str
    ok: bool
    event: str
    grant_id: str
    agent: str
    approval_id: str = ""


class _Names:
    """Everything one page of events mentions, read once."""

    def __init__(self, events: list[Any], user_id: int):
        self.user_id = user_id
        client_ids = {e.client_id for e in events if e.client_id}
        client_ids |= {e.actor.split(":", 1)[1] for e in events if e.actor.startswith(("agent:", "rs:"))}
        self.agents: dict[str, str] = dict(
            Agent.objects.filter(client_id__in=client_ids).values_list("client_id", "name")
        )
        self.servers: dict[str, str] = dict(
            ResourceServer.objects.filter(client_id__in=client_ids).values_list("client_id", "name")
        )
        approval_ids = {
            str(e.detail.get("approval_id"))
            for e in events
            if isinstance(e.detail, dict) and e.detail.get("approval_id")
        }
        self.approvals = {
            str(a.pk): a
            for a in ApprovalRequest.objects.filter(
                pk__in=[i for i in approval_ids if _uuid_like(i)], user_id=user_id
            ).only("id", "headline", "authorization_details", "decision_auth", "decision_method", "scope")
        }
        scopes = {a.scope for a in self.approvals.values()} | {  # budget events name their scope
            str(e.detail["scope"])
            for e in events
            if isinstance(e.detail, dict) and e.event.startswith("budget.") and e.detail.get("scope")
        }
        audiences = dict(ScopePolicy.objects.filter(name__in=scopes).values_list("name", "audience"))
        by_audience = dict(
            ResourceServer.objects.filter(audience__in=audiences.values()).values_list("audience", "name")
        )
        self.scope_system = {s: by_audience.get(a, a) for s, a in audiences.items()}

    def who(self, actor: str) -> str:
        kind, _, ident = actor.partition(":")
        if kind == "user":
            return "you" if ident == str(self.user_id) else "another user"
        if kind == "agent":
            return self.agents.get(ident, "an agent no longer registered")
        if kind == "rs":
            return self.servers.get(ident, "a system no longer registered")
        if kind == "admin":
            return "an administrator"
        return "Countersign"

    def agent(self, client_id: str) -> str:
        return self.agents.get(client_id, "an agent no longer registered" if client_id else "an agent")


def _uuid_like(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


def _what(approval: ApprovalRequest | None) -> str:
    return approval.headline if approval is not None else "a request"


def _did(agent: str, approval: ApprovalRequest | None, system: str) -> str:
    """What the agent did with its single-use token, from the approved details."""
    details = approval.authorization_details if approval is not None else None
    first = details[0] if isinstance(details, list) and details and isinstance(details[0], dict) else {}
    if first.get("type") == "ledger_entry" and first.get("amount"):
        return f"{agent} wrote {first.get('amount')} {first.get('currency', '')}".rstrip() + f" to {system}"
    return f"{agent} carried out {_what(approval)} at {system}"


def _money(d: dict[str, Any], key: str = "amount") -> str:
    try:
        return money(Decimal(str(d.get(key))), str(d.get("currency", "")))
    except (InvalidOperation, ValueError):
        return "an amount"


def approver_names(approvers: Any, *, user_id: int) -> str:
    """ "you and comptroller": the people whose approvals met a quorum (``approvals.votes``), in order."""
    subs = [str(a.get("sub", "")) for a in approvers or [] if isinstance(a, dict)]
    pks = [int(s[5:]) for s in subs if s.startswith("user:") and s[5:].isdigit()]
    found = dict(get_user_model().objects.filter(pk__in=pks).values_list("pk", "username"))
    names = ["you" if pk == user_id else found.get(pk, "a former user") for pk in pks]
    if len(names) <= 1:
        return names[0] if names else "nobody"
    return ", ".join(names[:-1]) + " and " + names[-1]


def _sentence(e: Any, n: _Names) -> str:
    d = e.detail if isinstance(e.detail, dict) else {}
    agent = n.agent(e.client_id)
    if (
        isinstance(d.get("instance"), str) and d["instance"]
    ):  # which instance of it: "Procurement Agent (instance 3f9c…)"
        agent = f"{agent} (instance {short_instance(d['instance'])})"
    who = n.who(e.actor)
    approval = n.approvals.get(str(d.get("approval_id", "")))
    reason = str(d.get("reason") or e.error or "").replace("_", " ")
    system = n.scope_system.get(
        str(d.get("scope", "")), n.who(e.actor) if e.actor.startswith("rs:") else "a system"
    )
    match e.event:
        case "login":
            words = auth_words(d.get("amr"))
            return "You signed in" + (f" with {words}" if words else "") + "."
        case "login.failed":
            return "Someone tried to sign in to your account with a wrong password."
        case "login.otp_failed":
            return "A wrong authenticator code was entered while signing in to your account."
        case "login.locked" | "attempts.locked":
            return "Signing in was locked for a while after too many wrong attempts."
        case "totp.enrolled":
            return "You set up an authenticator app for signing in."
        case "consent.given":
            allowed, asks = len(d.get("standard_scopes") or []), len(d.get("step_up_scopes") or [])
            return (
                f"You connected {agent}: {allowed} permission{'s' if allowed != 1 else ''} for the session"
                + (f", {asks} that ask{'s' if asks == 1 else ''} you each time" if asks else "")
                + "."
            )
        case "consent.refused":
            return f"You declined to connect {agent}."
        case "consent.request_refused":
            return f"A connection request from {agent} was refused: {reason}."
        case "token.issued":
            minutes = int(d.get("expires_in") or 0) // 60
            return (
                f"{agent} received a session token" + (f" valid for {minutes} min" if minutes else "") + "."
            )
        case "token.refreshed":
            return f"{agent} renewed its session token."
        case "token.exchanged":
            return f"{agent} re-issued its session token with its own key."
        case "token.delegated":
            return f"{agent} passed a token on to an agent you allowed at consent."
        case "token.refused":
            return f"{agent} was refused a token: {reason}."
        case "approval.requested":
            note = f" ({d['budget']})" if d.get("budget") else ""
            return f"{agent} asked for your approval: {_what(approval)}{note}."
        case "approval.delivered":
            return f"The request “{_what(approval)}” reached your inbox."
        case "approval.approved" if d.get("method") == "quorum":
            names = approver_names((d.get("auth") or {}).get("approvers"), user_id=n.user_id)
            return f"{_what(approval)} was approved by {names}, each signed in on their own."
        case "approval.denied" if d.get("method") == "quorum":
            voter = approver_names([{"sub": e.actor}], user_id=n.user_id)
            return f"{voter.capitalize()} denied {_what(approval)}; one denial ends a two-person approval."
        case "approval.approved":
            words = auth_words((approval.decision_auth or {}).get("amr") if approval else None)
            return f"You approved {_what(approval)}" + (f", signed in with {words}" if words else "") + "."
        case "approval.auto_approved":
            return f"{_what(approval)} was approved automatically by a rule your administrator set."
        case "approval.budget_approved":
            return f"{_what(approval)} was approved within your budget ({_money(d)} reserved)."
        case "budget.set":
            return (
                f"You gave {agent} a budget for {system}: up to {_money(d, 'per_action')} each, "
                f"{_money(d, 'total')} a {d.get('period', 'period')}."
            )
        case "budget.lowered":
            return (
                f"You lowered {agent}'s budget for {system}: up to {_money(d, 'per_action')} each, "
                f"{_money(d, 'total')} per period."
            )
        case "budget.ended":
            return f"You ended {agent}'s budget for {system}; every request asks you again."
        case "budget.refunded":
            return f"{_money(d)} went back to your budget: “{_what(approval)}” ended unused."
        case "budget.refused":
            return f"A budget was not changed: {reason}."
        case "approval.denied":
            return f"You denied {_what(approval)}."
        case "approval.expired":
            return f"Nobody answered “{_what(approval)}” in time; it expired."
        case "approval.cancelled":
            return f"“{_what(approval)}” was cancelled: {END_REASONS.get(str(d.get('reason')), reason)}."
        case "approval.vote":
            verb = "approved" if d.get("decision") == "approve" else "denied"
            voter = approver_names([{"sub": e.actor}], user_id=n.user_id)
            return f"{voter.capitalize()} {verb} {_what(approval)} (one of {d.get('quorum', 2)} approvals needed)."
        case "approval.vote_refused":
            return f"A vote on “{_what(approval)}” was not accepted: {reason}."
        case "approval.decision_refused":
            return f"A decision on “{_what(approval)}” was not accepted: {reason}."
        case "approval.reauth_failed":
            return f"Confirming it was you failed while approving “{_what(approval)}”."
        case "approval.request_refused":
            return f"{agent} asked for an approval that was refused: {reason}."
        case "approval.agent_notified":
            return f"{agent} was told your answer is ready."
        case "action_token.issued":
            return f"{agent} collected its single-use token for {_what(approval)}."
        case "action_token.redeemed" if approval is not None and (approval.decision_auth or {}).get(
            "approvers"
        ):
            names = approver_names(approval.decision_auth["approvers"], user_id=n.user_id)
            return _did(agent, approval, system) + f", approved by {names}."
        case "action_token.redeemed":
            if approval is not None and approval.decision_method == "budget":
                return _did(agent, approval, system) + ", approved within your budget."
            words = auth_words((approval.decision_auth or {}).get("amr") if approval else None)
            return (
                _did(agent, approval, system)
                + ", approved by you"
                + (f" with {words}" if words else "")
                + "."
            )
        case "redemption.refused":
            return f"{who.capitalize()} could not use a single-use token: {reason}."
        case "introspection.inactive":
            return f"{who.capitalize()} checked a token that is no longer valid ({reason})."
        case "grant.revoked":
            return f"The connection to {agent} ended: {END_REASONS.get(str(d.get('reason')), reason)}."
        case "grant.expired":
            return f"The connection to {agent} ended: its lifetime ended."
        case "grant.extended":
            return f"You extended the connection to {agent}."
        case "grant.used":
            uses = int(d.get("uses") or 0)
            what = ", ".join(str(o) for o in (d.get("operations") or [])[:3])
            return (
                f"{who.capitalize()} reported {uses} use{'s' if uses != 1 else ''} by {agent}"
                + (f": {what}" if what else "")
                + "."
            )
        case "agent_instance.created":
            return f"{agent} started acting on this connection."
        case "agent_instance.cut_off":
            return f"{who.capitalize()} cut off {agent}; the connection and its other instances keep working."
        case "agent_instance.refused":
            return f"{agent} was refused: it was cut off from this connection."
        case "refresh_token.reuse_detected":
            return f"A used refresh token of {agent} was presented again."
        case "rate.limited":
            return "Requests for your account came too fast and some were refused for a while."
        case "csrf.refused":
            return "A form was refused because it did not come from this site."
        case "receipt.refused" | "grant.view_refused":
            return "A page asked for a record that is not yours or does not exist."
        case "usage.refused":
            return f"{who.capitalize()} sent a usage report that was refused: {reason}."
        case "websocket.refused":
            return "A live-update connection was refused."
        # The delivery channels (approvals.notify): d["channel"] is websocket, push, email or webhook.
        case "approval.reached":
            return f"The request “{_what(approval)}” reached you by {CHANNEL_WORDS.get(str(d.get('channel')), 'a channel')}."
        case "approval.not_reached":
            return (
                f"The request “{_what(approval)}” did not reach you by "
                f"{CHANNEL_WORDS.get(str(d.get('channel')), 'a channel')}: {d.get('error') or reason}."
            )
        case "approval.opened":
            return (
                f"You opened “{_what(approval)}” from the {CLICK_WORDS.get(str(d.get('channel')), 'link')}."
            )
        case "approval.open_refused":
            return "A link opened a request that is not yours or does not exist."
        case "push.subscribed":
            return "You turned on notifications on a device."
        case "push.unsubscribed":
            return "You removed a device from your notifications."
        case "push.device_expired":
            return "A device's notifications had expired at its push service; it was removed."
        case "push.subscribe_refused":
            return f"Turning on notifications on a device was refused: {d.get('reason') or reason}."
        case "push.remove_refused":
            return "Removing a device was refused: it is not yours or does not exist."
        case "notify.preference_set":
            return f"You chose when to be emailed: {EMAIL_WORDS.get(str(d.get('email')), d.get('email'))}."
    fallback = e.event.replace(".", ": ").replace("_", " ").capitalize()
    return f"{fallback} ({reason})." if reason else f"{fallback}."


CHANNEL_WORDS = {
    "websocket": "your open inbox",
    "push": "a notification on your device",
    "email": "email",
    "webhook": "your organisation's webhook",
}
CLICK_WORDS = {"push": "notification", "email": "email", "webhook": "organisation's message"}
EMAIL_WORDS = {
    "unreachable": "when no device or open inbox is reachable",
    "always": "always",
    "never": "never",
}


def describe(events: list[Any], *, user_id: int) -> list[Entry]:
    names = _Names(events, user_id)
    return [
        Entry(
            id=e.pk,
            when=e.occurred_at,
            sentence=_sentence(e, names),
            ok=e.outcome == "ok",
            event=e.event,
            grant_id=e.grant_id,
            agent=names.agents.get(e.client_id, ""),
            approval_id=str(e.detail.get("approval_id", "")) if isinstance(e.detail, dict) else "",
        )
        for e in events
    ]


def agent_choices(*, user_id: int) -> list[tuple[str, str]]:
    """The agents this user ever connected, for the filter."""
    from consent.models import SessionGrant

    return list(
        SessionGrant.objects.filter(user_id=user_id)
        .values_list("agent__client_id", "agent__name")
        .distinct()
        .order_by("agent__name")
    )


def period_filter(period: str) -> Q:
    from datetime import timedelta

    from django.utils import timezone

    days = {"day": 1, "week": 7, "month": 30}.get(period)
    return Q(occurred_at__gte=timezone.now() - timedelta(days=days)) if days else Q()

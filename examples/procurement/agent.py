"""The procurement agent of the reference scenario, scripted, using :class:`countersign.AgentClient`.

1. prints a consent link (authorization code + PKCE S256) and waits for the code on its
   redirect URI (``http://127.0.0.1:8199/callback`` in the demo; a tiny ``http.server``);
2. exchanges the code for the session token, then runs the five steps, each against its own
   system with the matching scope:

   1. search the vendor catalog            (``catalog:read``, session token)
   2. check the budget                     (``budget:read``, session token)
   3. draft the purchase order             (``po:draft``, session token)
   4. route it for approval                (``approval:route``, session token)
   5. write the entry to the ledger        (``ledger:write``, step-up: the user approves this one
      entry in the browser inbox, the agent gets a one-shot action token, the ledger redeems it)

3. prints the ledger's answer, shows that the same action token cannot be used twice, and where
   to see the audit trail.

Run::

    python -m examples.procurement.agent --config var/demo/credentials.json [--open-command xdg-open]
"""

from __future__ import annotations

import argparse
import html
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from countersign import (
    ActionToken,
    AgentClient,
    AgentError,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalTimeout,
    GrantRevoked,
    SessionEnded,
)

from . import config as demo_config

Say = Callable[[str], None]


class StepFailed(Exception):
    """A system refused or failed a step; the run stops before anything else is written."""


@dataclass
class RunResult:
    purchase_order: str
    vendor: str
    amount: str
    entry: dict[str, Any]
    action_token: ActionToken
    ledger_status: int
    ledger_body: dict[str, Any]
    replay_status: int | None = None
    replay_body: dict[str, Any] | None = None


# --- the redirect URI: a tiny http.server --------------------------------------------------------


class CallbackServer:
    """Listens on the agent's loopback redirect URI for the authorization response (RFC 8252 §7.3)."""

    def __init__(self, redirect_uri: str, *, state: str, issuer: str) -> None:
        parts = urlsplit(redirect_uri)
        if parts.scheme != "http" or not demo_config.is_loopback(redirect_uri) or parts.port is None:
            raise demo_config.ConfigError(
                f"the redirect URI must be http://127.0.0.1:PORT/..., not {redirect_uri}"
            )
        self.path = parts.path or "/"
        self.state = state
        self.inbox = f"{issuer.rstrip('/')}/approvals/"
        self.results: queue.Queue[dict[str, str]] = queue.Queue()
        self._done = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                url = urlsplit(self.path)
                if url.path == "/favicon.ico":
                    self.send_response(204)
                    self.end_headers()
                    return
                if url.path != outer.path:
                    self._page(404, "Not found", "<p>This is the procurement agent's redirect URI.</p>")
                    return
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                if params.get("state") != outer.state:
                    self._page(
                        400,
                        "Unexpected answer",
                        "<p>This answer does not belong to the agent's current request (state differs); "
                        "it was ignored.</p>",
                    )
                    return
                if outer._done.is_set():
                    self._page(
                        200,
                        "Already connected",
                        f"<p>The agent already has its answer. "
                        f'<a href="{html.escape(outer.inbox)}">Open your approvals inbox</a>.</p>',
                    )
                    return
                outer._done.set()
                outer.results.put(params)
                if "code" in params:
                    self._page(
                        200,
                        "Procurement Agent connected",
                        "<p>The agent is connected and runs steps 1 to 4 now. Step 5, the ledger "
                        "write, will wait for <strong>your approval</strong> in your inbox.</p>"
                        f'<p><a href="{html.escape(outer.inbox)}">Open your approvals inbox</a> '
                        "(this page takes you there in a moment).</p>",
                        refresh=outer.inbox,
                    )
                else:
                    error = params.get("error", "no code")
                    self._page(
                        200,
                        "Not connected",
                        f"<p>The agent was not allowed ({html.escape(error)}). "
                        "Nothing was done. You can close this tab.</p>",
                    )

            def _page(self, status: int, title: str, body: str, refresh: str | None = None) -> None:
                meta = (
                    f'<meta http-equiv="refresh" content="2;url={html.escape(refresh)}">' if refresh else ""
                )
                page = (
                    f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
                    f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                    f"<title>{html.escape(title)}</title></head>"
                    f'<body style="font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;'
                    f'padding:0 1rem"><h1>{html.escape(title)}</h1>{body}</body></html>'
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Referrer-Policy", "no-referrer")  # the code is in this page's URL
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the URL holds the authorization code: keep it out of the terminal

        try:
            self.httpd = ThreadingHTTPServer((parts.hostname or "127.0.0.1", parts.port), Handler)
        except OSError as exc:
            raise demo_config.ConfigError(
                f"cannot listen on {parts.hostname}:{parts.port} for the callback: {exc.strerror}"
            ) from exc
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="agent-callback", daemon=True)

    def __enter__(self) -> CallbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait(self, timeout: float) -> dict[str, str]:
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer on the redirect URI within {timeout:.0f} s") from None


# --- the run -------------------------------------------------------------------------------------


class Steps:
    """Calls the systems with a fresh session token each time (the client re-mints before expiry)."""

    def __init__(
        self, agent: AgentClient, http: httpx.Client, systems: dict[str, demo_config.SystemConfig], say: Say
    ) -> None:
        self.agent, self.http, self.systems, self.say = agent, http, systems, say
        self.started = time.monotonic()
        self.reported: set[str] = set()

    def header(self, n: int, title: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        self.say(f"\n[{n}/5 · {elapsed // 60:02d}:{elapsed % 60:02d}] {title}")

    def call(
        self,
        system: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        s = self.systems[system]
        url = s.url(path)
        headers = self.agent.headers_for(method, url)
        response = self.http.request(method, url, params=params, json=json, headers=headers)
        body = _body(response)
        if response.status_code >= 400:
            challenge = response.headers.get("www-authenticate", "")
            raise StepFailed(
                f"{s.title} answered {response.status_code}: {body.get('error', '')} "
                f"{body.get('error_description', '')} {challenge}".rstrip()
            )
        checked = body.get("checked") or {}
        if checked and system not in self.reported:
            self.reported.add(system)
            self.say(
                f"      {s.title} checked both principals: {checked.get('user')} (the user) and "
                f"{checked.get('agent')} (this agent)"
            )
        return body


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"error": "not_json", "error_description": response.text[:200]}
    return body if isinstance(body, dict) else {"value": body}


def run(
    config: dict[str, Any],
    *,
    say: Say = print,
    issuer: str | None = None,
    query: str = "standing desk converter",
    quantity: int = 25,
    open_command: str | None = None,
    on_consent_url: Callable[[str], None] | None = None,
    consent_timeout: float = 900,
    approval_timeout: float = 660,
    show_replay: bool = True,
    end_session: bool = True,
) -> RunResult:
    """The whole procurement run. Raises :class:`StepFailed`, :class:`countersign.AgentError`
    (e.g. :class:`ApprovalDenied`) or :class:`TimeoutError`; nothing is written after a failure."""
    issuer = issuer or config["issuer"]
    systems = demo_config.systems(config)
    me = demo_config.agent(config)
    redirect_uri = me["redirect_uris"][0]
    officer = next((u for u in config.get("users", []) if u.get("username") == "officer"), None)
    scopes = [s.scope for s in systems.values()]
    inbox, activity = f"{issuer.rstrip('/')}/approvals/", f"{issuer.rstrip('/')}/activity/"

    http = httpx.Client(timeout=15.0, trust_env=not demo_config.is_loopback(issuer), follow_redirects=False)
    agent = AgentClient(
        issuer, me["client_id"], client_secret=me["client_secret"], redirect_uri=redirect_uri, http=http
    )
    try:
        say(f"{me['name']} (client_id {me['client_id']}) — authorization server {issuer}")
        url, state, verifier = agent.authorization_url(scopes)
        with CallbackServer(redirect_uri, state=state, issuer=issuer) as callback:
            login = (
                f" as {officer['username']} (password {officer['password']})"
                if officer and not str(officer.get("password", "")).startswith("(")
                else ""
            )
            say("\nConsent: open this link, sign in" + login + ", and click Allow:")
            say(f"  {url}")
            say(f"Waiting for the answer on {redirect_uri} ...")
            if on_consent_url is not None:
                on_consent_url(url)
            if open_command:
                try:
                    subprocess.Popen(
                        [*shlex.split(open_command), url],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                except OSError as exc:
                    say(f"  (could not run {open_command}: {exc.strerror}; open the link yourself)")
            answer = callback.wait(consent_timeout)
        if "code" not in answer:
            raise StepFailed(
                f"consent refused: {answer.get('error', 'no code')} "
                f"{answer.get('error_description', '')}".rstrip()
            )
        tokens = agent.exchange_code(answer["code"], verifier)
        say(
            f"\nConnected. Session token for {' '.join(sorted(tokens.scope))}; "
            f"valid {int(tokens.expires_in)} s, re-minted automatically "
            f"({'refresh token, rotated on use' if tokens.refresh_token else 'no refresh token'})."
        )
        say("ledger:write is not in it: step 5 will ask you, for that one entry.")

        steps = Steps(agent, http, systems, say)

        # 1. the catalog
        steps.header(1, f'Vendor catalog: search "{query}" ({quantity} needed)')
        results = steps.call("catalog", "GET", "/items", params={"q": query})["results"]
        for o in results:
            say(
                f"      {o['vendor']:<28} {o['sku']:<12} {o['unit_price']:>8} {o['currency']}  "
                f"{o['in_stock']:>4} in stock"
            )
        offers = [o for o in results if o["in_stock"] >= quantity]
        if not offers:
            raise StepFailed(f"no vendor has {quantity} in stock")
        best = min(offers, key=lambda o: Decimal(o["unit_price"]))
        total = str((Decimal(best["unit_price"]) * quantity).quantize(Decimal("0.01")))
        say(
            f"      -> {best['vendor']}: {quantity} x {best['unit_price']} = {total} {best['currency']} "
            f"(cheapest with enough stock)"
        )

        # 2. the budget
        steps.header(2, f"Budget: funds for {total} {best['currency']} ({best['category']})")
        lines = steps.call("budget", "GET", "/lines", params={"category": best["category"]})["lines"]
        if not lines:
            raise StepFailed(f"no budget line for {best['category']}")
        line = lines[0]
        check = steps.call("budget", "GET", f"/lines/{line['code']}/check", params={"amount": total})
        say(
            f"      {line['code']} ({line['name']}): {check['remaining']} remaining, "
            f"{check['remaining_after']} after this order"
        )
        if not check["sufficient"]:
            raise StepFailed(f"budget line {line['code']} has only {check['remaining']} left")

        # 3. the draft
        steps.header(3, "Procurement drafting: draft the purchase order")
        draft = steps.call(
            "drafting",
            "POST",
            "/drafts",
            json={
                "vendor_id": best["vendor_id"],
                "budget_line": line["code"],
                "lines": [{"sku": best["sku"], "quantity": quantity, "unit_price": best["unit_price"]}],
                "justification": f"{quantity} x {best['name']}",
            },
        )["draft"]
        po = draft["purchase_order"]
        say(
            f"      {po}: {draft['vendor']}, total {draft['total']} {draft['currency']} (status {draft['status']})"
        )

        # 4. the routing
        steps.header(4, f"Approval routing: route {po}")
        decision = steps.call(
            "routing",
            "POST",
            "/routes",
            json={
                "purchase_order": po,
                "amount": draft["total"],
                "currency": draft["currency"],
                "budget_line": line["code"],
                "vendor": draft["vendor"],
            },
        )["decision"]
        say(
            f"      {decision['route_id']}: {decision['route']} route ({decision['rule']}) -> "
            f"{', '.join(decision['approvers'])}"
        )

        # 5. the ledger: step-up
        steps.header(5, f"Financial ledger: record {po} — needs your approval")
        entry = {
            "type": "ledger_entry",
            "actions": ["append"],
            "purchase_order": po,
            "vendor": draft["vendor"],
            "amount": draft["total"],
            "currency": draft["currency"],
        }
        say(
            f"      Asking you to approve: append {entry['amount']} {entry['currency']} to {entry['vendor']} "
            f"({po})"
        )
        say(f"      Approve or deny it in your inbox: {inbox}")
        action = agent.request_approval(
            "ledger:write", [entry], binding_message=f"Step 5 of 5: record {po}", timeout=approval_timeout
        )
        say(f"      Approved. One-shot action token for exactly this entry, valid {action.expires_in} s.")
        ledger_url = systems["ledger"].url("/entries")
        response = http.post(
            ledger_url, json=entry, headers=agent.auth_headers("POST", ledger_url, token=action)
        )
        body = _body(response)
        if response.status_code != 201:
            raise StepFailed(
                f"the ledger answered {response.status_code}: {body.get('error', '')} "
                f"{body.get('error_description', '')}".rstrip()
            )
        recorded = body["recorded"]
        say(
            f"      Ledger answered {response.status_code}: entry #{recorded['seq']} recorded "
            f"{recorded['recorded_at']} for {recorded['user']} by {recorded['agent']} (approval "
            f"{recorded['approval_id']})"
        )
        result = RunResult(
            purchase_order=po,
            vendor=entry["vendor"],
            amount=entry["amount"],
            entry=entry,
            action_token=action,
            ledger_status=response.status_code,
            ledger_body=body,
        )

        if show_replay:
            replay = http.post(
                ledger_url, json=entry, headers=agent.auth_headers("POST", ledger_url, token=action)
            )
            result.replay_status, result.replay_body = replay.status_code, _body(replay)
            say(
                f"      Sending the same action token again: the ledger refuses it ({replay.status_code} "
                f"{result.replay_body.get('error', '')}: {result.replay_body.get('error_description', '')})"
            )

        if end_session:
            agent.end_session()  # a finished run keeps no access: the grant ends now, not in an hour
            say("      Done with the connection: the agent ended its session grant.")
        say(f"\nDone. Ledger entries: {ledger_url}")
        say(f"Audit trail (sign in as the officer): {activity}")
        return result
    finally:
        agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The scripted procurement agent (reference scenario).")
    parser.add_argument("--config", required=True, help="the JSON printed by manage.py seed_demo --json")
    parser.add_argument("--issuer", help="the authorization server's issuer (default: the config's issuer)")
    parser.add_argument("--query", default="standing desk converter", help="what to buy")
    parser.add_argument("--quantity", type=int, default=25)
    parser.add_argument("--open-command", help="a command to open the consent link with (e.g. xdg-open)")
    parser.add_argument("--consent-timeout", type=float, default=900, help="seconds to wait for consent")
    parser.add_argument("--approval-timeout", type=float, default=660, help="seconds to wait for step 5")
    parser.add_argument("--no-replay", action="store_true", help="do not show the refused second use")
    parser.add_argument(
        "--keep-session",
        action="store_true",
        help="leave the session grant live when done (by default the agent ends it)",
    )
    args = parser.parse_args(argv)
    try:
        config = demo_config.load(args.config)
        run(
            config,
            issuer=args.issuer,
            query=args.query,
            quantity=args.quantity,
            open_command=args.open_command,
            consent_timeout=args.consent_timeout,
            approval_timeout=args.approval_timeout,
            show_replay=not args.no_replay,
            end_session=not args.keep_session,
            say=lambda line: print(line, flush=True),
        )
    except ApprovalDenied:
        print("\nYou denied step 5: nothing was written to the ledger.", flush=True)
        return 2
    except (ApprovalExpired, ApprovalTimeout):
        print("\nStep 5 was not answered in time: nothing was written to the ledger.", flush=True)
        return 2
    except GrantRevoked as exc:
        print(f"\nThe connection was revoked or the agent suspended ({exc}): stopped.", flush=True)
        return 1
    except SessionEnded as exc:
        print(f"\nThe session ended ({exc}): consent again to continue.", flush=True)
        return 1
    except (StepFailed, AgentError, TimeoutError, demo_config.ConfigError) as exc:
        print(f"\nStopped: {exc}", flush=True)
        return 1
    except httpx.HTTPError as exc:
        print(f"\nStopped: cannot reach a system ({type(exc).__name__}: {exc})", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted.", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

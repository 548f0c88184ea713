"""Countersign's own settings, read through one accessor (DOT's ``oauth2_settings`` pattern).

Defaults live here; deployments override them in ``settings.COUNTERSIGN``.
"""

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from audit.conf import DEFAULTS as AUDIT_DEFAULTS

DEFAULTS: dict[str, Any] = {
    # The issuer identifier (RFC 8414 §2): an https URL in production, no trailing slash.
    "ISSUER": "http://127.0.0.1:8000",
    # Algorithm for new signing keys: ES256 (default, fast) or RS256.
    "SIGNING_ALG": "ES256",
    # How long a process trusts its cached view of the active signing key.
    "SIGNING_KEY_CACHE_SECONDS": 5,
    # How long a process may reuse a resource server's verified credentials where the statement
    # that acts re-checks them (redemption).
    "CLIENT_CACHE_SECONDS": 5,
    # Access-token lifetime for agents that do not set their own (seconds).
    "DEFAULT_ACCESS_TOKEN_TTL": 900,
    # The longest grant lifetime an agent may be configured to offer (seconds).
    "MAX_GRANT_LIFETIME": 30 * 24 * 3600,
    # Lifetimes the consent screen offers, capped by the agent's maximum.
    "GRANT_LIFETIME_CHOICES": [3600, 8 * 3600, 24 * 3600, 7 * 24 * 3600, 30 * 24 * 3600],
    # Clock skew accepted when verifying our own tokens (RFC 8725 §3.10: explicit, small).
    "LEEWAY_SECONDS": 10,
    # Default approval window and action-token TTL for new step-up scopes.
    "DEFAULT_APPROVAL_WINDOW": 600,
    "DEFAULT_ACTION_TOKEN_TTL": 120,
    # CIBA (OpenID CIBA Core §7.3): minimum seconds between polls of a pending request.
    "CIBA_INTERVAL": 5,
    # Approval fatigue: most pending prompts a user, or an agent, may have open at once.
    "MAX_PENDING_PER_USER": 10,
    "MAX_PENDING_PER_AGENT": 50,
    # Longest agent note shown with a prompt (CIBA §7.1 binding_message).
    "BINDING_MESSAGE_MAX": 120,
    # private_key_jwt (RFC 7523): the longest an assertion may live; its jti is remembered that long.
    "CLIENT_ASSERTION_MAX_LIFETIME": 300,
    # Agent instances (draft-ietf-oauth-attestation-based-client-auth): the longest a Client
    # Attestation the agent's key signs for one instance may live, and how old its PoP may be.
    "CLIENT_ATTESTATION_MAX_LIFETIME": 3600,
    "CLIENT_ATTESTATION_POP_MAX_AGE": 60,
    # RFC 8693 re-mint: how long after expiry a session token may still be exchanged
    # (by its own agent, authenticated with its key, while the grant lives).
    "EXCHANGE_GRACE_SECONDS": 3600,
    # The token endpoint's grants (RFC 6749 §4.5 extension grants included): grant_type -> handler.
    # Every other grant_type is refused with unsupported_grant_type.
    "TOKEN_GRANTS": {
        "authorization_code": "consent.grants.authorization_code.exchange_code",
        "refresh_token": "consent.grants.refresh.refresh",
        "urn:openid:params:grant-type:ciba": "approvals.grants.collect",
        "urn:ietf:params:oauth:grant-type:token-exchange": "consent.grants.token_exchange.exchange",
    },
    # CIBA §7.1 requested_expiry: the shortest window granted (a shorter request gets this one).
    "REQUESTED_EXPIRY_MIN": 60,
    # Approval fatigue over time: most prompts created for a user, or by an agent, in a sliding window
    # (collapsed duplicates and auto-approved requests do not count).
    "PROMPT_WINDOW_SECONDS": 600,
    "MAX_PROMPTS_PER_USER_IN_WINDOW": 30,
    "MAX_PROMPTS_PER_AGENT_IN_WINDOW": 300,
    # JSON a client sends (authorization_details, websocket frames): nesting depth, checked before
    # parsing (consent.limits.jsonbounds).
    "JSON_MAX_DEPTH": 16,
    # ... and of a JWT's header and claims (which carry authorization_details and act chains).
    "JWT_MAX_DEPTH": 32,
    # HTTP rate limits (consent.limits.middleware). rule -> {"paths": prefixes, dimension: [requests, seconds]};
    # the first rule with a matching prefix applies. Dimensions: "client" (the client id a protocol
    # request names), "user" (the signed-in user), "source" (the client address). A dimension left
    # out or set to None is not limited; RATE_LIMITS_ENABLED False turns the layer off.
    "RATE_LIMITS_ENABLED": True,
    "RATE_LIMITS": {
        "protocol": {
            "paths": [
                "/o/token/",
                "/o/bc-authorize/",
                "/o/redeem/",
                "/o/introspect/",
                "/o/revoke/",
                "/o/rs-approvals/",
                "/o/usage/",
            ],
            "client": [1200, 60],
            "source": [6000, 60],
        },
        "pages": {
            "paths": ["/accounts/", "/approvals/", "/grants/", "/activity/", "/o/authorize/", "/admin/"],
            "user": [120, 60],
            "source": [600, 60],
        },
        "public": {"paths": ["/.well-known/", "/o/agents/", "/audit/checkpoints/"], "source": [1200, 60]},
        # Log shippers pulling the audit log (/audit/events/) and proofs (/audit/proofs/).
        "audit": {"paths": ["/audit/"], "source": [600, 60]},
        # RFC 7591 §3 registrations create rows: few per source.
        "registration": {"paths": ["/o/register/"], "source": [20, 60]},
    },
    # Attempt limits on secrets (consent.limits.attempts, consent.limits.middleware, consent.limits.logins): kind -> failures
    # allowed per "account" and per "source" within "seconds". Past them the account or source is
    # locked for LOCKOUT_SECONDS, doubled on each further lockout within a day, up to LOCKOUT_MAX_SECONDS.
    # "client": agent secrets and private_key_jwt; "resource_server": resource-server credentials;
    # "fresh_auth": re-authentication before approving; "totp": TOTP codes; "login": passwords.
    "ATTEMPT_LIMITS": {
        "client": {"account": 20, "source": 10, "seconds": 300},
        "resource_server": {"account": 20, "source": 10, "seconds": 300},
        "fresh_auth": {"account": 5, "source": 10, "seconds": 900},
        "totp": {"account": 5, "source": 10, "seconds": 900},
        "login": {"account": 5, "source": 5, "seconds": 900},
        # audit-reader tokens (/audit/events/, /audit/proofs/): bearer tokens, so per source only.
        "audit_reader": {"source": 10, "seconds": 300},
    },
    "LOCKOUT_SECONDS": 60,
    "LOCKOUT_MAX_SECONDS": 3600,
    # The audit ledger's keys (AUDIT_CHECKPOINT_FILE, ...) are audit's own: audit.conf.DEFAULTS.
    **AUDIT_DEFAULTS,
    # Agents that were never registered (consent.selfdescribed): RFC 7591 dynamic registration at
    # /o/register/ is "open", "off", or "initial_access_token" (a bearer token from REGISTRATION_ACCESS_TOKENS,
    # RFC 7591 §3); Client ID Metadata Documents (https client_id URLs) are fetched when
    # CLIENT_ID_METADATA_DOCUMENTS is True.
    "CLIENT_REGISTRATION": "open",
    "REGISTRATION_ACCESS_TOKENS": [],
    "CLIENT_ID_METADATA_DOCUMENTS": True,
    # Fetching a metadata document: seconds for the whole fetch, most bytes read, and how long a document
    # is kept at most (its Cache-Control max-age is honoured below this ceiling) and at least.
    "CIMD_TIMEOUT_SECONDS": 5.0,
    "CIMD_MAX_BYTES": 5120,
    "CIMD_CACHE_MAX_SECONDS": 86400,
    "CIMD_CACHE_MIN_SECONDS": 60,
    # A CA bundle (PEM file) to verify documents' TLS with instead of the system's; "" for the system's.
    "CIMD_CA_BUNDLE": "",
    # Which scopes a self-described agent may ever ask for: scope-policy names, or [] for every scope.
    # Step-up scopes need the agent active: in production a self-described agent starts pending_review
    # until an admin activates it (agent_update CLIENT_ID --status active); in development (an http
    # loopback issuer) it starts active, and loopback documents and registrations are accepted.
    "SELF_DESCRIBED_SCOPES": [],
    # Prompts beyond the open inbox (approvals.notify). Web Push (RFC 8030/8291/8292): on unless
    # PUSH_ENABLED is False; the VAPID key pair is generated on first use (or by vapid_key). The VAPID
    # "sub" contact (RFC 8292 §2.1): a mailto: or https: URI; "" uses the issuer.
    "PUSH_ENABLED": True,
    "PUSH_CONTACT": "",
    # Push endpoints must be https; loopback http endpoints are accepted only with this True (or DEBUG).
    "PUSH_ALLOW_LOOPBACK": False,
    "PUSH_TIMEOUT_SECONDS": 10.0,
    "PUSH_MAX_DEVICES_PER_USER": 10,
    # The subscription JSON a browser POSTs: most bytes accepted.
    "PUSH_SUBSCRIPTION_MAX_BYTES": 4096,
    # Email: the preference of users who never chose ("unreachable", "always" or "never"), and how long
    # after a prompt goes out the "unreachable" check looks at what the other channels achieved.
    "EMAIL_DEFAULT_PREFERENCE": "unreachable",
    "EMAIL_FALLBACK_DELAY_SECONDS": 30,
    # Organisation webhooks (Standard Webhooks): seconds per attempt.
    "WEBHOOK_TIMEOUT_SECONDS": 5.0,
}


class CountersignSettings:
    """``settings.COUNTERSIGN`` over ``DEFAULTS``, read as attributes.

    The first read of any name looks the dict up and keeps every value as an attribute of this
    object, so later reads are plain attribute reads: each ``settings.X`` costs ~3,900 instructions
    (Django's ``LazySettings.__getattribute__``), and a code exchange read these four times. Replacing
    ``COUNTERSIGN`` (``override_settings``, pytest-django's ``settings``) sends ``setting_changed``,
    which drops the kept values (``_forget``); the dict is never changed in place after start-up.
    """

    def __getattr__(self, name: str) -> Any:  # only for names not kept yet
        if name not in DEFAULTS:
            raise AttributeError(f"Unknown Countersign setting {name!r}")
        overrides = getattr(settings, "COUNTERSIGN", {})
        self.__dict__.update({key: overrides.get(key, default) for key, default in DEFAULTS.items()})
        return self.__dict__[name]

    def forget(self) -> None:
        self.__dict__.clear()


countersign_settings = CountersignSettings()


@receiver(setting_changed)
def _forget(*, setting: str, **kwargs: Any) -> None:
    if setting == "COUNTERSIGN":
        countersign_settings.forget()


def _kind(value: Any) -> type:
    # bool before int (bool is an int); a whole number may stand for a float default and back.
    for kind in (bool, str, dict, list, tuple):
        if isinstance(value, kind):
            return list if kind is tuple else kind
    return float if isinstance(value, int | float) else type(value)


def validate(overrides: dict[str, Any]) -> None:
    """Refuse ``settings.COUNTERSIGN`` at start-up (``ConsentConfig.ready``, every process) when a
    key is unknown (a misspelt key would leave its default in force without a word) or a value is
    of another kind than its default (``"60"`` for 60 would fail, or compare wrongly, at the first
    request that reads it)."""
    if not isinstance(overrides, dict):
        raise ImproperlyConfigured(f"COUNTERSIGN must be a dict, not {type(overrides).__name__}")
    problems = []
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(DEFAULTS))})")
    for name, value in sorted(overrides.items()):
        default = DEFAULTS.get(name)
        if default is not None and value is not None and _kind(value) is not _kind(default):
            problems.append(
                f"{name} must be {_kind(default).__name__} like its default ({default!r}), "
                f"not {type(value).__name__} {value!r}"[:300]
            )
    if problems:
        raise ImproperlyConfigured("COUNTERSIGN settings: " + "; ".join(problems))

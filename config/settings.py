"""Countersign settings.

Every value that varies between deployments comes from the environment, with a
default that works on a developer's machine (SQLite, local Redis, loopback issuer).
Project-specific knobs live in the ``COUNTERSIGN`` dict and are read through
``consent.conf.countersign_settings``.
"""

import json
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

# Django's generic classes (ModelAdmin[Agent], QuerySet[...] as a base) subscriptable at run time,
# as django-stubs types them.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("COUNTERSIGN_VAR_DIR", BASE_DIR / "var"))


def _development_secret_key() -> str:
    """A random key kept in var/ so sessions survive restarts on a dev machine."""
    path = VAR_DIR / "secret_key"
    if path.exists():
        return path.read_text().strip()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    path.write_text(key)
    path.chmod(0o600)
    return key


DEBUG = os.environ.get("DEBUG", "0") == "1"
ISSUER = os.environ.get("COUNTERSIGN_ISSUER", "http://127.0.0.1:8000").rstrip("/")
ISSUER_URL = urlparse(ISSUER)
# An https issuer means a real deployment: nothing may fall back to development defaults.
PRODUCTION = ISSUER_URL.scheme == "https"

if PRODUCTION and not os.environ.get("SECRET_KEY"):
    raise ImproperlyConfigured("SECRET_KEY must be set when COUNTERSIGN_ISSUER is https")
SECRET_KEY = os.environ.get("SECRET_KEY") or _development_secret_key()

# The issuer's host always; more (comma-separated) from ALLOWED_HOSTS. Also the websocket Origin allow-list.
_extra_hosts = os.environ.get("ALLOWED_HOSTS", "" if PRODUCTION else "127.0.0.1,localhost,testserver")
ALLOWED_HOSTS = list(
    dict.fromkeys(
        [ISSUER_URL.hostname or "127.0.0.1", *(h.strip() for h in _extra_hosts.split(",") if h.strip())]
    )
)
CSRF_TRUSTED_ORIGINS = [ISSUER]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "oauth2_provider",
    "channels",
    "axes",
    "audit",
    "consent",
    "approvals",
    "ledger",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Token, CIBA, redemption, introspection and revocation POSTs skip what they never use (config.middleware).
    "config.middleware.ProtocolLaneMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "config.timezone.TimezoneMiddleware",
    # Rate limits and the attempt limit on client secrets: one Redis round trip, no SQL (consent.limits.middleware).
    "consent.limits.middleware.RateLimitMiddleware",
    "config.logging.RequestContextMiddleware",
    "config.middleware.DependencyDownMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "config.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Turns a password lockout into our "too many attempts" page (consent.limits.logins); last, as axes asks.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "approvals.context_processors.approvals_badge",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        # One pool per process instead of persistent connections (below): web processes run requests
        # on a fixed set of threads (granian), but the ws process (ASGI) and Celery hand work to
        # threads that come and go, where a kept-open connection per thread only piles up. A request
        # takes a connection from the pool and returns it when it finishes, on every kind of process.
        conn_max_age=0,
    )
}
if (
    DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    and os.environ.get("DATABASE_POOL", "1") == "1"
):
    # At least as many connections as a web process has threads (config.serving.WEB_THREADS), so no
    # request waits for a connection another thread of its own process holds.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": int(os.environ.get("DATABASE_POOL_SIZE", "20")),
        "timeout": 10,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # The hot paths' statements (consent.rows, server-side binding) are prepared on each connection
    # after this many runs, so PostgreSQL parses and plans them once instead of on every request.
    # Django's own (client-side binding) cursors never prepare. "none" turns it off (e.g. behind a
    # transaction-pooling PgBouncer older than 1.21).
    _prepare = os.environ.get("DATABASE_PREPARE_THRESHOLD", "2")
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
        None if _prepare == "none" else int(_prepare)
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take the write lock up front, so two writers never
    # both read the audit chain head before one of them appends (see audit.services).
    # WAL lets readers run beside the writer; synchronous=NORMAL is durable in WAL mode across
    # application crashes (an OS crash may lose the last commits), the usual SQLite server setting.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    # Server-generated client secrets carry 256 bits of entropy: a fast hash is the
    # right tool for them (CONVENTIONS: secrets at rest). Never used for passwords.
    "consent.hashers.ClientSecretHasher",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/grants/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = PRODUCTION
CSRF_COOKIE_SECURE = PRODUCTION
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if PRODUCTION:
    SECURE_HSTS_SECONDS = int(os.environ.get("HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = os.environ.get("HSTS_INCLUDE_SUBDOMAINS", "1") == "1"
    SECURE_HSTS_PRELOAD = os.environ.get("HSTS_PRELOAD", "1") == "1"
    SECURE_SSL_REDIRECT = os.environ.get("SECURE_SSL_REDIRECT", "1") == "1"
    # Health checks come over plain HTTP from the load balancer.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    if os.environ.get("TRUST_X_FORWARDED_PROTO", "1") == "1":
        # TLS ends at the proxy in front; it must overwrite this header on every request.
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Static files are served by the app itself (no CDN, works offline), straight from the finders.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

# Bodies are forms of a few fields; nothing legitimate comes near these (Django answers 400 past them).
DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("DATA_UPLOAD_MAX_MEMORY_SIZE", str(256 * 1024)))

# Login attempt counts live in Redis so every node shares them (django-axes; consent.limits.logins).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "limits": {
        "BACKEND": "consent.limits.cache.FailOpenRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cs:lim:axes",
        "OPTIONS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
    },
    # Copies of sessions, the database's rows being the truth (config.sessions).
    "sessions": {
        "BACKEND": "consent.limits.cache.FailOpenRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cs:sess",
        "OPTIONS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
    },
}
SESSION_ENGINE = "config.sessions"
SESSION_CACHE_ALIAS = "sessions"
AUTHENTICATION_BACKENDS = [
    "consent.limits.logins.LoginAttemptsBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "axes.handlers.cache.AxesCacheHandler"
AXES_CACHE = "limits"
AXES_FAILURE_LIMIT = "consent.limits.logins.failure_limit"
AXES_COOLOFF_TIME = "consent.limits.logins.cool_off"
AXES_LOCKOUT_CALLABLE = "consent.limits.logins.lockout_response"
# Per account and, separately, per source address.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = lambda request: request.META.get("REMOTE_ADDR", "")  # noqa: E731 (config.wsgi sets it)
AXES_VERBOSE = False

# Sizing the channel layer for the inbox fan-out (approvals.delivery, approvals.channel_layer):
# - capacity: channels_redis keeps ONE Redis queue per web process for all of its websockets and
#   writes one message per process per group_send, so capacity bounds a process's backlog of sends
#   its receive loop has not pulled yet (and, separately, each consumer's in-process buffer). A
#   burst from 200 agents is ~200 prompts plus their removals; 1000 is five such bursts, at ~1 KB a
#   message 1 MB per process at worst. Past it messages are dropped: the per-user sequence and the
#   inbox's periodic check repair that from the database within seconds.
# - expiry 60 s: a message that waited a minute is stale; the check has long since replaced it.
# - group_expiry 1 h: channels of a node that died without group_discard leave the groups within
#   the hour; live consumers re-join on their periodic check long before their membership ages out.
# - pool_size: one bounded, waiting pool per event loop, so hundreds of simultaneous connects or
#   disconnects queue for a connection instead of raising MaxConnectionsError.
CHANNEL_LAYER_CAPACITY = int(os.environ.get("CHANNEL_LAYER_CAPACITY", "1000"))
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "approvals.channel_layer.InboxChannelLayer",
        "CONFIG": {
            # channels_redis blocks 5 s in BZPOPMIN; redis-py 8's default 5 s socket timeout would cut
            # that read and drop idle inbox websockets, so the socket waits longer than the pop.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
            "capacity": CHANNEL_LAYER_CAPACITY,
            "expiry": 60,
            "group_expiry": 3600,
            "pool_size": int(os.environ.get("CHANNEL_LAYER_POOL_SIZE", "50")),
            "pool_timeout": 10,
        },
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
# A task whose worker died unacknowledged is redelivered after this many seconds. Longer than
# the approval window, since ETA tasks (on-time expiry) wait unacknowledged too; every task is
# idempotent, so a redelivery is harmless.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "900"))
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Threads, not forked processes: every task here waits on PostgreSQL and Redis for most of its
# time (a delivery is a read, two Redis scripts and a small transaction), so a worker process
# runs --concurrency tasks at once on threads with one database pool and one channel-layer loop,
# without prefork's pipe and pickling per task. CELERY_WORKER_POOL=prefork restores the default.
CELERY_WORKER_POOL = os.environ.get("CELERY_WORKER_POOL", "threads")
CELERY_TASK_DEFAULT_QUEUE = "countersign"
APPROVAL_SWEEP_SECONDS = float(os.environ.get("APPROVAL_SWEEP_SECONDS", "2"))
CELERY_BEAT_SCHEDULE = {
    "grants-expire": {"task": "consent.tasks.grants_expire", "schedule": 30.0},
    # Windows and action tokens end on time by themselves (every read checks expires_at); the sweep
    # moves their rows to EXPIRED and tells open inboxes, within this many seconds.
    "approvals-expire": {"task": "approvals.expire_due", "schedule": APPROVAL_SWEEP_SECONDS},
    "approvals-redeliver": {"task": "approvals.redeliver_undelivered", "schedule": 30.0},
}

# django-oauth-toolkit: our agent registry and token models replace its defaults
# from the first migration, and our server class adds the grant types we support.
OAUTH2_PROVIDER_APPLICATION_MODEL = "consent.Agent"
OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL = "consent.AccessToken"
OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL = "consent.RefreshToken"
OAUTH2_PROVIDER_GRANT_MODEL = "consent.AuthorizationCode"
OAUTH2_PROVIDER_ID_TOKEN_MODEL = "consent.IDToken"

OAUTH2_PROVIDER = {
    "OAUTH2_SERVER_CLASS": "consent.oauth.server.CountersignServer",
    "OAUTH2_VALIDATOR_CLASS": "consent.oauth.validator.CountersignValidator",
    "SCOPES_BACKEND_CLASS": "consent.oauth.scopes.PolicyScopes",
    "CLIENT_SECRET_HASHER": "cs_sha256",
    "PKCE_REQUIRED": True,
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,
    "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": True,
    # Our validator revokes the whole session grant on reuse; DOT's flag keeps its own checks in line.
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 60,
    # Plain http redirect URIs only for development (loopback agents); never in production.
    "ALLOWED_REDIRECT_URI_SCHEMES": ["https"] if PRODUCTION else ["https", "http"],
    "REQUEST_APPROVAL_PROMPT": "force",
    "OIDC_ENABLED": False,
    # RFC 9207 `iss` in authorization responses: exactly the issuer our metadata publishes.
    "OIDC_ISS_ENDPOINT": ISSUER,
}

COUNTERSIGN = {
    "ISSUER": ISSUER,
    "SIGNING_ALG": os.environ.get("COUNTERSIGN_SIGNING_ALG", "ES256"),
    "SIGNING_KEY_CACHE_SECONDS": int(os.environ.get("COUNTERSIGN_SIGNING_KEY_CACHE_SECONDS", "5")),
    # COUNTERSIGN_RATE_LIMITS_ENABLED=0 turns the HTTP rate limits off (benchmarks that drive one client
    # hard); attempt limits on secrets stay on.
    "RATE_LIMITS_ENABLED": os.environ.get("COUNTERSIGN_RATE_LIMITS_ENABLED", "1") == "1",
    "AUDIT_CHECKPOINT_FILE": os.environ.get("COUNTERSIGN_AUDIT_CHECKPOINT_FILE", ""),
    "AUDIT_CHECKPOINT_WEBHOOK": os.environ.get("COUNTERSIGN_AUDIT_CHECKPOINT_WEBHOOK", ""),
}
# Whole limit tables as JSON, for deployments that keep configuration in the environment
# (the shapes are documented in consent.conf).
for _name in ("RATE_LIMITS", "ATTEMPT_LIMITS"):
    if os.environ.get(f"COUNTERSIGN_{_name}"):
        COUNTERSIGN[_name] = json.loads(os.environ[f"COUNTERSIGN_{_name}"])
for _name in (
    "CLIENT_REGISTRATION",
    "CIMD_CA_BUNDLE",
):  # agents that were never registered (consent.selfdescribed)
    if os.environ.get(f"COUNTERSIGN_{_name}"):
        COUNTERSIGN[_name] = os.environ[f"COUNTERSIGN_{_name}"]
if os.environ.get("COUNTERSIGN_REGISTRATION_ACCESS_TOKENS"):
    COUNTERSIGN["REGISTRATION_ACCESS_TOKENS"] = os.environ["COUNTERSIGN_REGISTRATION_ACCESS_TOKENS"].split()
for _name in (
    "LOCKOUT_SECONDS",
    "LOCKOUT_MAX_SECONDS",
    "MAX_PROMPTS_PER_USER_IN_WINDOW",
    "MAX_PROMPTS_PER_AGENT_IN_WINDOW",
):
    if os.environ.get(f"COUNTERSIGN_{_name}"):
        COUNTERSIGN[_name] = int(os.environ[f"COUNTERSIGN_{_name}"])

# Prompts beyond the open inbox (approvals.notify): loopback http push endpoints (tests, development)
# and the email fallback's delay.
if os.environ.get("COUNTERSIGN_PUSH_ALLOW_LOOPBACK"):
    COUNTERSIGN["PUSH_ALLOW_LOOPBACK"] = os.environ["COUNTERSIGN_PUSH_ALLOW_LOOPBACK"] == "1"
for _name in ("PUSH_CONTACT", "EMAIL_DEFAULT_PREFERENCE"):
    if os.environ.get(f"COUNTERSIGN_{_name}"):
        COUNTERSIGN[_name] = os.environ[f"COUNTERSIGN_{_name}"]
if os.environ.get("COUNTERSIGN_EMAIL_FALLBACK_DELAY_SECONDS"):
    COUNTERSIGN["EMAIL_FALLBACK_DELAY_SECONDS"] = int(os.environ["COUNTERSIGN_EMAIL_FALLBACK_DELAY_SECONDS"])

# Email (the prompts' fallback channel): SMTP when EMAIL_HOST is set, else printed to the console in
# development. Django's own settings, from the environment.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "")
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND") or (
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend"
)
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "587" if EMAIL_HOST else "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = os.environ.get("EMAIL_USE_TLS", "1" if EMAIL_HOST and EMAIL_PORT == 587 else "0") == "1"
EMAIL_USE_SSL = os.environ.get("EMAIL_USE_SSL", "0") == "1"
EMAIL_TIMEOUT = int(os.environ.get("EMAIL_TIMEOUT", "10"))
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "Countersign <countersign@localhost>")

LOG_FORMAT = os.environ.get("LOG_FORMAT", "json" if PRODUCTION else "text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "config.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}
CSRF_FAILURE_VIEW = "audit.views.csrf_failure"

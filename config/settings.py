"""Countersign settings.

Every value that varies between deployments comes from the environment, with a
default that works on a developer's machine (SQLite, local Redis, loopback issuer).
Project-specific knobs live in the ``COUNTERSIGN`` dict and are read through
``consent.conf.countersign_settings``.
"""

import os
import secrets
from pathlib import Path

import dj_database_url

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


SECRET_KEY = os.environ.get("SECRET_KEY") or _development_secret_key()
DEBUG = os.environ.get("DEBUG", "0") == "1"

ISSUER = os.environ.get("COUNTERSIGN_ISSUER", "http://127.0.0.1:8000").rstrip("/")
ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
    if h.strip()
]
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
    "audit",
    "consent",
    "approvals",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = None
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
        # Under ASGI every request runs in a fresh thread, so a kept-open connection is never
        # reused: persistent connections only pile up (Django docs). Pool instead (below).
        conn_max_age=0,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and os.environ.get("DATABASE_POOL", "1") == "1":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": int(os.environ.get("DATABASE_POOL_SIZE", "20")), "timeout": 10}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take the write lock up front, so two writers never
    # both read the audit chain head before one of them appends (see audit.services).
    # WAL lets readers run beside the writer; synchronous=NORMAL is durable in WAL mode across
    # application crashes (an OS crash may lose the last commits), the usual SQLite server setting.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20,
                                       "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
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
SESSION_COOKIE_SECURE = ISSUER.startswith("https://")
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
X_FRAME_OPTIONS = "DENY"

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

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "countersign"
CELERY_BEAT_SCHEDULE = {
    "grants-expire": {"task": "consent.tasks.grants_expire", "schedule": 30.0},
    "approvals-expire": {"task": "approvals.expire_due", "schedule": 10.0},
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
    "ACCESS_TOKEN_GENERATOR": "consent.tokens.session_token_generator",
    "REFRESH_TOKEN_GENERATOR": "oauthlib.oauth2.rfc6749.tokens.random_token_generator",
    "SCOPES_BACKEND_CLASS": "consent.oauth.scopes.PolicyScopes",
    "CLIENT_SECRET_HASHER": "cs_sha256",
    "PKCE_REQUIRED": True,
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 60,
    "ALLOWED_REDIRECT_URI_SCHEMES": ["https", "http"],
    "REQUEST_APPROVAL_PROMPT": "force",
    "OIDC_ENABLED": False,
}

COUNTERSIGN = {
    "ISSUER": ISSUER,
    "SIGNING_ALG": os.environ.get("COUNTERSIGN_SIGNING_ALG", "ES256"),
    "SIGNING_KEY_CACHE_SECONDS": int(os.environ.get("COUNTERSIGN_SIGNING_KEY_CACHE_SECONDS", "5")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
CSRF_FAILURE_VIEW = "audit.views.csrf_failure"

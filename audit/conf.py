"""The audit ledger's settings: its keys of ``settings.COUNTERSIGN``, with their defaults.

``audit`` depends on no other app of ours, so it reads its own keys here; ``consent.conf``
validates them with the rest of ``COUNTERSIGN`` at start-up.
"""

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # The ledger's witnesses (audit.ledger): a file each signed checkpoint is appended to (one JSON
    # line; put it on storage the database's administrators cannot rewrite), and a URL each is POSTed
    # to (JSON, by a Celery task). Empty: off. audit_verify checks against the file's newest line.
    "AUDIT_CHECKPOINT_FILE": "",
    "AUDIT_CHECKPOINT_WEBHOOK": "",
    # Most events one pull of /audit/events/ returns.
    "AUDIT_EXPORT_PAGE_MAX": 1000,
}


class AuditSettings:
    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Unknown audit setting {name!r}")
        return getattr(settings, "COUNTERSIGN", {}).get(name, DEFAULTS[name])


audit_settings = AuditSettings()

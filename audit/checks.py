"""System checks for the audit ledger (``manage.py check --database default``, and ``migrate``)."""

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Tags, Warning, register
from django.db import DatabaseError, connections


@register(Tags.database)
def audit_role_cannot_rewrite_history(
    app_configs: Sequence[AppConfig] | None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """In production (an https issuer) the application's role must not be able to change audit rows."""
    from .keys import ledger_signer

    if not databases or "default" not in databases or not ledger_signer().issuer().startswith("https://"):
        return []
    connection = connections["default"]
    if connection.vendor != "postgresql":
        return [
            Warning(
                "the audit ledger is on SQLite: nothing stops the application rewriting it",
                hint="use PostgreSQL in production (docs/deployment.md)",
                id="audit.W002",
            )
        ]
    from .grants import audit_privileges

    try:
        privileges = audit_privileges()
    except DatabaseError:
        return []  # the database is unreachable: other checks and /readyz say so
    if privileges.safe:
        return []
    return [
        Warning(
            privileges.describe(),
            hint="run migrations as the owner role and the application as a role set up with "
            "`manage.py audit_grants --role ROLE --apply` (docs/deployment.md); expected only for the "
            "owner role while it migrates",
            id="audit.W001",
        )
    ]

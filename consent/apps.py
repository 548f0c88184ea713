from django.apps import AppConfig


class ConsentConfig(AppConfig):
    name = "consent"
    verbose_name = "Agents and consent"

    def ready(self) -> None:
        from django.conf import settings

        from audit.keys import register_ledger_signer
        from audit.services import register_statement_cursor
        from audit.verification import register_check

        from . import checks  # noqa: F401  (registers system checks)
        from .conf import validate
        from .keys import ServerSigner
        from .ledger_checks import grants_without_consent
        from .rows import cursor

        validate(getattr(settings, "COUNTERSIGN", {}))
        # audit depends on no other app: it is handed the keys it signs checkpoints with, and the
        # check of consent's own records that audit_verify runs.
        register_ledger_signer(ServerSigner())
        register_check(grants_without_consent)
        # and the kept statement cursors its writers append events through.
        register_statement_cursor(cursor)

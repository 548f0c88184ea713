"""Who may change audit rows on PostgreSQL: the SQL that takes it away from the application.

Two roles. The *owner* role owns the schema and runs ``manage.py migrate`` (and can lift the
TRUNCATE refusal for its own session, and disable triggers: keep its credentials off the
application's machines). The *application* role owns nothing; it may read and write every
table, but on the audit ledger only SELECT and INSERT (the sealer also UPDATEs its one head
row), so it cannot UPDATE, DELETE or TRUNCATE an event, link, tree node or checkpoint, nor
disable the triggers that refuse those (only an owner can).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection

from .models import AuditCheckpoint, AuditEvent, AuditHead, AuditLink, AuditNode

LEDGER_TABLES = tuple(m._meta.db_table for m in (AuditEvent, AuditLink, AuditNode, AuditCheckpoint))
HEAD_TABLE = AuditHead._meta.db_table


def grant_statements(role: str, *, owner: str | None = None) -> list[str]:
    """GRANT/REVOKE for the application role, to run as the owner after every ``migrate``."""
    q = connection.ops.quote_name
    app = q(role)
    ledger = ", ".join(q(t) for t in LEDGER_TABLES)
    statements = [
        f"GRANT CONNECT ON DATABASE {q(connection.settings_dict['NAME'])} TO {app}",
        f"GRANT USAGE ON SCHEMA public TO {app}",
        f"REVOKE CREATE ON SCHEMA public FROM {app}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app}",
        f"REVOKE UPDATE, DELETE, TRUNCATE, TRIGGER, REFERENCES ON {ledger} FROM {app}",
        f"REVOKE DELETE, TRUNCATE, TRIGGER, REFERENCES ON {q(HEAD_TABLE)} FROM {app}",
    ]
    if owner:
        statements += [
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {q(owner)} IN SCHEMA public "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app}",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {q(owner)} IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {app}",
        ]
    return statements


@dataclass(frozen=True)
class AuditPrivileges:
    role: str
    superuser: bool
    owns: list[str]
    can_modify: list[str]  # "table: UPDATE, DELETE"

    @property
    def safe(self) -> bool:
        return not (self.superuser or self.owns or self.can_modify)

    def describe(self) -> str:
        if self.safe:
            return f"role {self.role} cannot UPDATE, DELETE or TRUNCATE audit rows"
        why = (
            (["is a superuser"] if self.superuser else [])
            + ([f"owns {', '.join(self.owns)}"] if self.owns else [])
            + ([f"may {'; '.join(self.can_modify)}"] if self.can_modify else [])
        )
        return f"role {self.role} can change audit rows: it {', and '.join(why)}"


def audit_privileges(role: str | None = None) -> AuditPrivileges:
    """What ``role`` (default: the connected one) may do to the audit tables."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user")
        role = role or cursor.fetchone()[0]
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [role])
        row = cursor.fetchone()
        superuser = bool(row and row[0])
        owns, can_modify = [], []
        for table in (*LEDGER_TABLES, HEAD_TABLE):
            kinds = ("DELETE", "TRUNCATE") if table == HEAD_TABLE else ("UPDATE", "DELETE", "TRUNCATE")
            cursor.execute(
                "SELECT pg_has_role(%s, c.relowner, 'USAGE'), "
                + ", ".join(f"has_table_privilege(%s, c.oid, '{k}')" for k in kinds)
                + " FROM pg_class c WHERE c.oid = to_regclass(%s)",
                [role] * (1 + len(kinds)) + [table],
            )
            found = cursor.fetchone()
            if found is None:
                continue
            if found[0]:
                owns.append(table)
            allowed = [k for k, ok in zip(kinds, found[1:], strict=True) if ok]
            if allowed:
                can_modify.append(f"{', '.join(allowed)} {table}")
    return AuditPrivileges(role=role, superuser=superuser, owns=owns, can_modify=can_modify)

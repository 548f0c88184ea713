from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction

from audit.grants import audit_privileges, grant_statements


class Command(BaseCommand):
    help = (
        "PostgreSQL: print (or --apply, connected as the owner role that runs migrations) the GRANT/REVOKE "
        "statements that let the application role read and write but never UPDATE, DELETE or TRUNCATE audit "
        "rows; --check reports what a role may do to them and exits non-zero if it can change them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--role", help="the application's role (default for --check: the connected role)")
        parser.add_argument(
            "--owner", help="the owner role: also set default privileges for tables it creates later"
        )
        parser.add_argument("--apply", action="store_true", help="run the statements now, in one transaction")
        parser.add_argument(
            "--check", action="store_true", help="report the role's privileges on audit tables"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("audit_grants is for PostgreSQL (SQLite has no roles)")
        if options["check"]:
            privileges = audit_privileges(options["role"])
            if not privileges.safe:
                raise CommandError(
                    privileges.describe() + " (run audit_grants --role ROLE --apply as the owner, "
                    "and run the application as ROLE)"
                )
            self.stdout.write(privileges.describe())
            return
        if not options["role"]:
            raise CommandError("--role ROLE: the application's database role")
        statements = grant_statements(options["role"], owner=options["owner"])
        if not options["apply"]:
            self.stdout.write(";\n".join(statements) + ";")
            return
        with transaction.atomic(), connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        self.stdout.write(
            f"applied {len(statements)} statements; " + audit_privileges(options["role"]).describe()
        )

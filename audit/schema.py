"""Schema operations for migrations of any app (PostgreSQL only; other databases have nothing to do)."""

from collections.abc import Sequence
from typing import Any

from django.db import migrations


def drop_pattern_indexes(table: str, columns: Sequence[str]) -> migrations.RunPython:
    """Drop the ``varchar_pattern_ops`` indexes Django adds on PostgreSQL beside the index of an
    indexed or unique ``CharField`` (named ``<table>_<column>_<hash>_like``).

    They serve only prefix ``LIKE`` queries, and a column that never gets one pays for a second
    index entry on every row written. The field's own index (or unique constraint) stays. Reversed
    by creating them again as Django did.
    """

    def names(schema_editor: Any) -> list[tuple[str, str]]:
        # Django's own naming of them (BaseDatabaseSchemaEditor._create_index_name, suffix "_like")
        return [(c, schema_editor._create_index_name(table, [c], suffix="_like")) for c in columns]

    def forwards(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        for _, name in names(schema_editor):
            schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")

    def backwards(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        for column, name in names(schema_editor):
            schema_editor.execute(
                f"CREATE INDEX IF NOT EXISTS {quote(name)} ON {quote(table)} ({quote(column)} varchar_pattern_ops)"
            )

    return migrations.RunPython(forwards, backwards)

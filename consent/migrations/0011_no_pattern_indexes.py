"""Access tokens are looked up by equality only (``token_checksum``, ``jti``): drop the two
``varchar_pattern_ops`` indexes Django added beside their unique constraints (which stay), a
second index entry on every token minted."""

from django.db import migrations

from audit.schema import drop_pattern_indexes


class Migration(migrations.Migration):
    dependencies = [("consent", "0010_agent_instances")]
    operations = [drop_pattern_indexes("consent_accesstoken", ["token_checksum", "jti"])]

"""Register an organisation's webhook (Standard Webhooks); prints its whsec_ secret once."""

import json
from typing import Any
from urllib.parse import urlparse

from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError, CommandParser

from approvals.notify.services import organisation_webhook_create
from consent.conf import countersign_settings


class Command(BaseCommand):
    help = "Announce every prompt of an organisation's users (a group, or everyone) to a signed webhook."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--url", required=True)
        parser.add_argument("--group", help="the organisation: a group's name (default: every user)")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **o: Any) -> None:
        parsed = urlparse(o["url"])
        issuer_is_dev = countersign_settings.ISSUER.startswith("http://")
        if parsed.scheme != "https" and not (parsed.scheme == "http" and issuer_is_dev):
            raise CommandError("the webhook URL must be https (http only in development)")
        if not parsed.hostname:
            raise CommandError("the webhook URL needs a host")
        group = None
        if o["group"]:
            group = Group.objects.filter(name=o["group"]).first()
            if group is None:
                raise CommandError(f"no group named {o['group']!r}")
        hook, secret = organisation_webhook_create(name=o["name"], url=o["url"], group=group, actor="cli")
        if o["json"]:
            self.stdout.write(
                json.dumps({"id": hook.pk, "name": hook.name, "url": hook.url, "secret": secret})
            )
        else:
            self.stdout.write(f"Webhook {hook.name} ({hook.pk}) -> {hook.url}\nSecret (shown once): {secret}")

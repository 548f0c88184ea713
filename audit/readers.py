"""Audit readers: admin-issued bearer tokens for pulling the audit log (RFC 6750 §2.1 ``Bearer``).

A token is 256 bits from ``secrets``; only its SHA-256 is stored and looked up (a fast hash is
right for a high-entropy secret). Issuing and revoking are audited.
"""

from __future__ import annotations

import hashlib
import secrets

from django.db import IntegrityError, transaction
from django.utils import timezone

from .models import AuditReader
from .services import audit_record

TOKEN_PREFIX = "csa_"


class ReaderError(Exception):
    pass


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def audit_reader_create(*, name: str, actor: str) -> tuple[AuditReader, str]:
    if not name or len(name) > 100:
        raise ReaderError("a reader needs a name of 1 to 100 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            reader = AuditReader.objects.create(name=name, token_hash=_digest(token))
            audit_record(event="audit_reader.created", actor=actor, detail={"name": name})
    except IntegrityError:
        raise ReaderError(f"an audit reader named {name!r} exists already") from None
    return reader, token


def audit_reader_revoke(*, name: str, actor: str) -> None:
    with transaction.atomic():
        if (
            AuditReader.objects.filter(name=name, revoked_at__isnull=True).update(revoked_at=timezone.now())
            != 1
        ):
            raise ReaderError(f"no active audit reader named {name!r}")
        audit_record(event="audit_reader.revoked", actor=actor, detail={"name": name})


def audit_reader_authenticate(token: str) -> AuditReader | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
        return None
    return AuditReader.objects.filter(token_hash=_digest(token), revoked_at__isnull=True).first()

"""What the audit trail tells the rest of the project, without depending on it."""

from django.dispatch import Signal

# Sent for every audit event built (``audit.services.audit_event``), with the ids it names:
# ``user_id``, ``client_id``, ``grant_id``. The structured log (``config.logging``) binds them to
# the current request's log lines, so a request's logs name who it acted for.
event_built = Signal()

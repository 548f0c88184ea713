"""Signals other apps listen to, so consent never imports them."""

from django.dispatch import Signal

# Sent inside the revoking transaction. kwargs: grant_id, reason, actor, user_id.
grant_ended = Signal()

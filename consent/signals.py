"""Signals other apps listen to, so consent never imports them."""

from django.dispatch import Signal

# Sent inside the revoking transaction. kwargs: grant_id, reason, actor, user_id.
grant_ended = Signal()

# Sent inside the cutting-off transaction (consent.instances.agent_instance_cut_off).
# kwargs: grant_id, instance (the id in act.instance), actor, user_id.
instance_cut_off = Signal()

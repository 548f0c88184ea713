"""A grant that ends takes its pending prompts with it, as revocation does: the prompt's window
is capped at the grant's end, so polls stop saying ``authorization_pending`` at that moment, and
the sweep (every ``APPROVAL_SWEEP_SECONDS``; queued here by the test, as the beat would) cancels
it and tells open inboxes. Real server, real worker, real websocket."""

import time
from datetime import timedelta

import httpx
from django.utils import timezone

from approvals.models import ApprovalRequest
from audit.models import AuditEvent
from consent.models import SessionGrant
from tests.approvals.test_delivery_live import Inbox, _ask
from tests.conftest import Scenario, basic
from tests.live import LiveStack

CIBA = "urn:openid:params:grant-type:ciba"


def test_a_grant_that_ends_cancels_its_pending_prompt_at_once(
    live: LiveStack, scenario: Scenario, session_token: str
) -> None:
    ends = timezone.now() + timedelta(seconds=3)
    SessionGrant.objects.update(expires_at=ends)
    inbox = Inbox(live, scenario.user)
    try:
        inbox.next()
        asked = _ask(live, scenario, session_token)
        assert asked.status_code == 200 and asked.json()["expires_in"] <= 3
        prompt = inbox.next_of("upsert")["prompt"]
        time.sleep(max(0.0, (ends - timezone.now()).total_seconds()) + 0.2)
        live.sweep()  # as the beat does, every APPROVAL_SWEEP_SECONDS
        removed = inbox.next_of("remove", timeout=15)
        ended_after = (timezone.now() - ends).total_seconds()
    finally:
        inbox.close()
    assert removed["id"] == prompt["id"] and removed["status"] == "cancelled"
    assert ended_after < 5  # the first sweep after the end, not the grant sweep's 30 seconds
    approval = ApprovalRequest.objects.get()
    assert approval.status == ApprovalRequest.Status.CANCELLED and approval.decision_method == "grant_ended"
    assert AuditEvent.objects.filter(event="approval.cancelled", detail__reason="grant_ended").count() == 1
    time.sleep(0.1)
    poll = httpx.post(
        f"{live.url}/o/token/",
        data={"grant_type": CIBA, "auth_req_id": asked.json()["auth_req_id"]},
        headers={"Authorization": basic(scenario.agent.client_id, scenario.agent_secret)},
        timeout=10,
    )
    assert poll.status_code == 400 and poll.json()["error"] == "access_denied"

"""How many SQL statements the officer's decision costs (the approve POST from the inbox).

As in tests/consent/test_statement_counts.py: counted as the test database logs them, BEGIN and
COMMIT included, each request in its own transaction. A change that adds a statement to this
path changes the budget here and says why.
"""

import pytest
from django.test import Client
from pytest_django import DjangoAssertNumQueries

from approvals.models import ApprovalRequest
from tests.approvals.conftest import Agent
from tests.conftest import PASSWORD, Scenario

pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = {
    # the user (the session comes from Redis: config.sessions), the request with its grant, agent
    # and scope policy, then one statement: PENDING -> APPROVED under the grant's lock with its
    # audit row (approvals.services._decide_in_one_statement)
    "approve": 3,
}


def test_approve_from_the_inbox(
    agent: Agent, client: Client, scenario: Scenario, django_assert_max_num_queries: DjangoAssertNumQueries
) -> None:
    assert agent.ask().status_code == 200
    approval = ApprovalRequest.objects.get()
    client.login(username="officer", password=PASSWORD)
    with django_assert_max_num_queries(BUDGET["approve"]):
        response = client.post(f"/approvals/{approval.pk}/approve/")
    assert response.status_code == 302 and response["Location"] == "/approvals/"
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.APPROVED

"""Builders for the two-person approval tests: a ``finance`` group of officials and a quorum policy."""

from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, User

from consent.models import ScopePolicy
from consent.services import scope_set
from tests.conftest import PASSWORD

THRESHOLD = "amount > 10000"


@dataclass
class Officials:
    group: Group
    alice: User
    bob: User
    carol: User  # in no group until a test adds her


def officials() -> Officials:
    users = get_user_model().objects
    group = Group.objects.create(name="finance")
    alice = users.create_user("alice", password=PASSWORD)
    bob = users.create_user("bob", password=PASSWORD)
    carol = users.create_user("carol", password=PASSWORD)
    alice.groups.add(group)
    bob.groups.add(group)
    return Officials(group=group, alice=alice, bob=bob, carol=carol)


def require_quorum(
    group: Group, *, size: int = 2, exclude_requester: bool = True, when: str = THRESHOLD, **extra: Any
) -> ScopePolicy:
    policy, _ = scope_set(
        name="ledger:write",
        values={
            "audience": "http://ledger.test",
            "sensitivity": ScopePolicy.Sensitivity.STEP_UP,
            "quorum": size,
            "approver_group_id": group.pk,
            "exclude_requester": exclude_requester,
            "quorum_when": when,
            **extra,
        },
    )
    return policy

from typing import Any

from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Step-up approvals"

    def ready(self) -> None:
        from celery import current_app
        from django.db import transaction

        from consent.models import SessionGrant
        from consent.selectors import TOKEN_INTROSPECTORS
        from consent.signals import grant_ended, instance_cut_off
        from consent.tokens import ACTION_TOKEN_TYP

        from . import tasks  # noqa: F401  (registers the tasks the services queue by name, in every process)
        from .notify import checks as notify_checks  # noqa: F401  (system checks of the channels' settings)
        from .notify import tasks as notify_tasks  # noqa: F401  (the delivery channels' tasks)
        from .selectors import action_token_introspect
        from .services import approvals_cancel_for_grant, approvals_cancel_for_instance

        def cancel_open_approvals(sender: object, grant_id: Any, reason: str, **kwargs: Any) -> None:
            approvals_cancel_for_grant(grant_id=grant_id, reason=reason)

        grant_ended.connect(cancel_open_approvals, weak=False, dispatch_uid="approvals.cancel_open_approvals")

        def cancel_instance_approvals(
            sender: object, grant_id: object, instance: str, **kwargs: object
        ) -> None:
            approvals_cancel_for_instance(grant_id=grant_id, instance=instance)

        instance_cut_off.connect(
            cancel_instance_approvals, weak=False, dispatch_uid="approvals.cancel_instance"
        )

        def tell_open_pages(sender: object, grant_id: Any, reason: str, **kwargs: Any) -> None:
            # An open story page of that grant re-reads itself (approvals.tasks.push_grant_changed).
            user_id = kwargs.get("user_id")
            if user_id is None:
                user_id = SessionGrant.objects.filter(pk=grant_id).values_list("user_id", flat=True).first()
            if user_id is not None:
                transaction.on_commit(
                    lambda: current_app.tasks["approvals.push_grant_changed"].delay(str(grant_id), user_id),
                    robust=True,
                )

        grant_ended.connect(tell_open_pages, weak=False, dispatch_uid="approvals.tell_open_pages")

        # consent's introspection endpoint answers for the action tokens this app mints (RFC 7662).
        TOKEN_INTROSPECTORS[ACTION_TOKEN_TYP] = action_token_introspect

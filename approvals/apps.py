from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Step-up approvals"

    def ready(self):
        from consent.signals import grant_ended

        from .services import approvals_cancel_for_grant

        def cancel_open_approvals(sender, grant_id, reason, **kwargs):
            approvals_cancel_for_grant(grant_id=grant_id, reason=reason)

        grant_ended.connect(cancel_open_approvals, weak=False, dispatch_uid="approvals.cancel_open_approvals")

        def tell_open_pages(sender, grant_id, reason, **kwargs):
            from django.db import transaction

            from consent.models import SessionGrant

            from .tasks import push_grant_changed

            user_id = kwargs.get("user_id")
            if user_id is None:
                user_id = SessionGrant.objects.filter(pk=grant_id).values_list("user_id", flat=True).first()
            if user_id is not None:
                transaction.on_commit(lambda: push_grant_changed.delay(str(grant_id), user_id), robust=True)

        grant_ended.connect(tell_open_pages, weak=False, dispatch_uid="approvals.tell_open_pages")

from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Step-up approvals"

    def ready(self):
        from consent.signals import grant_ended

        from . import tasks  # noqa: F401  (registers the tasks the services queue by name, in every process)
        from .services import approvals_cancel_for_grant

        def cancel_open_approvals(sender, grant_id, reason, **kwargs):
            approvals_cancel_for_grant(grant_id=grant_id, reason=reason)

        grant_ended.connect(cancel_open_approvals, weak=False, dispatch_uid="approvals.cancel_open_approvals")

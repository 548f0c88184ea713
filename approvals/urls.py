from django.urls import path

from . import rs_stepup, views

urlpatterns = [
    path("approvals/", views.inbox_view, name="approvals-inbox"),
    path("approvals/<uuid:approval_id>/approve/", views.approve_view, name="approval-approve"),
    path("approvals/<uuid:approval_id>/deny/", views.deny_view, name="approval-deny"),
    path("approvals/<uuid:approval_id>/confirm/", views.confirm_view, name="approval-confirm"),
    path("approvals/<uuid:approval_id>/receipt/", views.receipt_view, name="approval-receipt"),
    path("o/bc-authorize/", views.BackchannelAuthenticationView.as_view(), name="ciba-authorize"),
    path("o/redeem/", views.RedemptionView.as_view(), name="redeem"),
    path("o/rs-approvals/", rs_stepup.ResourceServerApprovalView.as_view(), name="rs-approval"),
    path("o/rs-approvals/token/", rs_stepup.ResourceServerCollectView.as_view(), name="rs-approval-token"),
]

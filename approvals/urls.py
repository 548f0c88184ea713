from django.urls import path

from . import rs_stepup, views
from .notify import views as notify_views

urlpatterns = [
    path("approvals/", views.inbox_view, name="approvals-inbox"),
    path("approvals/<uuid:approval_id>/approve/", views.approve_view, name="approval-approve"),
    path("approvals/<uuid:approval_id>/deny/", views.deny_view, name="approval-deny"),
    path("approvals/<uuid:approval_id>/confirm/", views.confirm_view, name="approval-confirm"),
    path("approvals/<uuid:approval_id>/receipt/", views.receipt_view, name="approval-receipt"),
    path("approvals/<uuid:approval_id>/", notify_views.open_view, name="approval-open"),
    path("approvals/devices/", notify_views.devices_view, name="approval-devices"),
    path("approvals/devices/subscribe/", notify_views.subscribe_view, name="approval-device-subscribe"),
    path(
        "approvals/devices/<str:device_id>/remove/", notify_views.remove_view, name="approval-device-remove"
    ),
    path("approvals/devices/email/", notify_views.email_preference_view, name="approval-email-preference"),
    path("approvals/sw.js", notify_views.service_worker_view, name="approval-service-worker"),
    path("approvals/manifest.webmanifest", notify_views.manifest_view, name="approval-manifest"),
    path("o/bc-authorize/", views.BackchannelAuthenticationView.as_view(), name="ciba-authorize"),
    path("o/redeem/", views.RedemptionView.as_view(), name="redeem"),
    path("o/rs-approvals/", rs_stepup.ResourceServerApprovalView.as_view(), name="rs-approval"),
    path("o/rs-approvals/token/", rs_stepup.ResourceServerCollectView.as_view(), name="rs-approval-token"),
]

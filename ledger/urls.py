from django.urls import path

from . import api

urlpatterns = [
    path("audit/checkpoints/", api.checkpoints_view, name="audit-checkpoints"),
    path("audit/checkpoints/<str:tree_size>", api.checkpoint_view, name="audit-checkpoint"),
    path("audit/events/", api.events_view, name="audit-events"),
    path("audit/proofs/inclusion", api.inclusion_view, name="audit-proof-inclusion"),
    path("audit/proofs/consistency", api.consistency_view, name="audit-proof-consistency"),
    path("audit/proofs/approval", api.approval_proof_view, name="audit-proof-approval"),
]

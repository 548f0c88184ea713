from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from .selectors import audit_events_for_user


@login_required
def activity_view(request):
    return render(request, "audit/activity.html", {"events": audit_events_for_user(user_id=request.user.pk)})

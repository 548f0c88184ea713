from django.http import HttpRequest, HttpResponse


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF refusals are refusals too: audited, then Django's 403 page."""
    from django.views.csrf import csrf_failure as django_csrf_failure

    from .services import audit_refusal

    user = getattr(request, "user", None)
    user_id = user.pk if user is not None and user.is_authenticated else None
    audit_refusal(
        event="csrf.refused",
        error="csrf_failed",
        actor=f"user:{user_id}" if user_id else "",
        user_id=user_id,
        request=request,
        detail={"path": request.path[:200], "reason": reason[:200]},
    )
    return django_csrf_failure(request, reason=reason)

from functools import wraps

from django.http import HttpResponseNotAllowed

from .services import audit_refusal


def post_only(view):
    """Like ``require_POST``, but the refusal leaves an audit row."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.method != "POST":
            user = request.user if request.user.is_authenticated else None
            audit_refusal(
                event="http.method_refused",
                error="method_not_allowed",
                actor=f"user:{user.pk}" if user else "",
                user_id=user.pk if user else None,
                request=request,
                detail={"path": request.path[:200], "method": request.method[:10]},
            )
            return HttpResponseNotAllowed(["POST"])
        return view(request, *args, **kwargs)

    return wrapper

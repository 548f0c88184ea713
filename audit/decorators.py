from collections.abc import Callable
from functools import wraps
from typing import Concatenate, ParamSpec, TypeVar

from django.http import HttpRequest, HttpResponseNotAllowed
from django.http.response import HttpResponseBase

from .services import audit_refusal

P = ParamSpec("P")
Request = TypeVar("Request", bound=HttpRequest)
Response = TypeVar("Response", bound=HttpResponseBase)


def post_only(
    view: Callable[Concatenate[Request, P], Response],
) -> Callable[Concatenate[Request, P], Response | HttpResponseNotAllowed]:
    """Like ``require_POST``, but the refusal leaves an audit row."""

    @wraps(view)
    def wrapper(request: Request, /, *args: P.args, **kwargs: P.kwargs) -> Response | HttpResponseNotAllowed:
        if request.method != "POST":
            user = request.user if request.user.is_authenticated else None
            audit_refusal(
                event="http.method_refused",
                error="method_not_allowed",
                actor=f"user:{user.pk}" if user else "",
                user_id=user.pk if user else None,
                request=request,
                detail={"path": request.path[:200], "method": (request.method or "")[:10]},
            )
            return HttpResponseNotAllowed(["POST"])
        return view(request, *args, **kwargs)

    return wrapper

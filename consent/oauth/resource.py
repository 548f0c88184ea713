"""Resource indicators for OAuth 2.0 (RFC 8707).

https://www.rfc-editor.org/rfc/rfc8707

§2: a client names the resource(s) it wants a token for with one or more
``resource`` parameters, at the authorization endpoint and at the token endpoint.
Each is an absolute URI without a fragment (§2). The token's ``aud`` is then
exactly the requested resources that the grant's scopes serve, and its ``scope``
only the scopes those resources serve: a token for one server is refused by every
other. A resource no requested (or granted) scope serves is ``invalid_target``
(§2, "the requested resource is invalid, missing, unknown, or malformed").

The scope -> audience map is the one session tokens are addressed by
(``consent.tokens.audiences_for``, cached), so narrowing costs no statement.
"""

from urllib.parse import urlsplit

from ..errors import InvalidTarget
from ..tokens import audiences_for

MAX_RESOURCES = 10
MAX_URI_LENGTH = 500


def parse_resources(values: list[str]) -> list[str]:
    """The ``resource`` values of one request, checked (§2); ``InvalidTarget`` when malformed."""
    resources: list[str] = []
    for value in values:
        if not value:
            continue
        if len(value) > MAX_URI_LENGTH:
            raise InvalidTarget("A resource indicator is too long.", reason="resource too long")
        parts = urlsplit(value)
        if (
            not parts.scheme
            or not parts.netloc
            or parts.fragment
            or "#" in value
            or parts.username is not None
        ):
            raise InvalidTarget(
                "A resource must be an absolute URI without a fragment (RFC 8707 §2).",
                reason=f"malformed resource {value[:100]!r}",
            )
        if value not in resources:
            resources.append(value)
    if len(resources) > MAX_RESOURCES:
        raise InvalidTarget(f"At most {MAX_RESOURCES} resources per request.", reason="too many resources")
    return resources


def form_resources(raw: str) -> list[str]:
    """``resource`` as the token endpoint's form parser keeps it: repeated values joined by spaces
    (an absolute URI has none)."""
    return parse_resources(raw.split()) if raw else []


def narrow(resources: list[str], scopes: list[str]) -> tuple[list[str], list[str]]:
    """(audience, scopes) of a token for ``resources`` out of ``scopes`` (§2.2).

    Every resource must be the audience of at least one of ``scopes``, else ``InvalidTarget``;
    the scopes kept are those whose audience was asked for, in their order.
    """
    served = {scope: audiences_for([scope]) for scope in scopes}
    audiences = {aud for auds in served.values() for aud in auds}
    outside = [r for r in resources if r not in audiences]
    if outside:
        raise InvalidTarget(
            "The requested resource is not served by the granted scopes.",
            reason=f"resource outside the grant: {outside[0][:100]}",
        )
    wanted = set(resources)
    return list(resources), [s for s in scopes if wanted & set(served[s])]

"""Token revocation (RFC 7009), for agents. Revoking any token of a session grant revokes the grant.

https://www.rfc-editor.org/rfc/rfc7009

§2.1: the agent authenticates as at the token endpoint and sends ``token`` (and
optionally ``token_type_hint``). §2.2: the answer is 200 whether or not the token
was known, so a caller learns nothing about tokens that are not its own. An agent instance
(``consent.instances``) cut off from the grant may not end it: ``invalid_client``, ``instance_cut_off``.
"""

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.views.decorators.csrf import csrf_exempt

from audit.services import audit_refusal

from ..conf import countersign_settings
from ..errors import InvalidRequest, OAuthError
from ..http import NO_STORE, claimed_client_id, error_response
from ..instances import refuse_cut_off
from ..models import AccessToken, Agent, AgentInstance, RefreshToken, SessionGrant
from ..oauth.attestation import InstanceProof
from ..oauth.client_auth import authenticate_client_request, presented_credentials
from ..services import grant_revoke
from ..tokens import token_checksum
from .token import form_params


def revoke(*, token: str, hint: str, agent: Agent, instance: InstanceProof | None = None) -> None:
    """§2.1: find the token among the agent's own, in the hinted table first; revoke its grant."""
    kinds: list[type[AccessToken] | type[RefreshToken]] = (
        [RefreshToken, AccessToken] if hint == "refresh_token" else [AccessToken, RefreshToken]
    )
    checksum = token_checksum(token)
    for model in kinds:
        grant_id = (
            model.objects.filter(token_checksum=checksum, application=agent)
            .values_list("session_grant_id", flat=True)
            .first()
        )
        if grant_id is not None:
            if (
                instance is not None
                and AgentInstance.objects.filter(
                    grant_id=grant_id, instance_id=instance.instance, status=AgentInstance.Status.CUT_OFF
                ).exists()
            ):
                owner = SessionGrant.objects.filter(pk=grant_id).values_list("user_id", flat=True).first()
                raise refuse_cut_off(
                    agent=agent,
                    grant_id=grant_id,
                    user_id=owner or 0,
                    instance=instance.instance,
                    where="revocation",
                )
            grant_revoke(grant_id=grant_id, reason="revoked_by_agent", actor=agent.actor_id)
            return


@csrf_exempt
def revocation_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    try:
        if request.META.get("QUERY_STRING"):
            raise InvalidRequest("URL query parameters are not allowed")
        params = form_params(request)
        if not params.get("token"):
            raise InvalidRequest("Missing token parameter.")
        credentials = presented_credentials(
            params,
            request.META.get("HTTP_AUTHORIZATION", ""),
            attestation=request.META.get("HTTP_OAUTH_CLIENT_ATTESTATION"),
            pop=request.META.get("HTTP_OAUTH_CLIENT_ATTESTATION_POP"),
        )
        agent, instance = authenticate_client_request(
            credentials, endpoint_url=f"{countersign_settings.ISSUER}/o/revoke/"
        )
        revoke(token=params["token"], hint=params.get("token_type_hint", ""), agent=agent, instance=instance)
    except OAuthError as exc:
        if exc.audited:
            return error_response(exc)
        audit_refusal(
            event="revocation.refused",
            error=exc.error,
            actor="",
            client_id=claimed_client_id(request),
            request=request,
            detail={"reason": exc.reason},
        )
        return error_response(exc)
    return HttpResponse(status=200, headers=NO_STORE)

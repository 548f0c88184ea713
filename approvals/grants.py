"""OpenID Connect Client-Initiated Backchannel Authentication (CIBA) Core 1.0 — token request.

https://openid.net/specs/openid-client-initiated-backchannel-authentication-core-1_0.html

§10.1: the agent polls the token endpoint with
``grant_type=urn:openid:params:grant-type:ciba`` and its ``auth_req_id``,
authenticating as it does for every token request. The answer (§11) is
``authorization_pending``, ``slow_down``, ``access_denied``, ``expired_token``,
``invalid_grant`` — or, once the user approved, the one-shot action token. This
grant never mints a session token. Registered with the token endpoint through
``COUNTERSIGN["TOKEN_GRANTS"]``.
"""

from typing import Any

from consent.errors import InvalidClient, InvalidRequest
from consent.grants.issue import TokenRequest
from consent.oauth import client_auth

from .services import approval_collect

GRANT_TYPE_CIBA = "urn:openid:params:grant-type:ciba"


def collect(req: TokenRequest) -> dict[str, Any]:
    if req.credentials.method == client_auth.NONE:  # §7.1: CIBA clients authenticate; a public one cannot
        raise InvalidClient(reason="CIBA needs client authentication")
    agent = req.authenticate()
    auth_req_id = req.params.get("auth_req_id")
    if not auth_req_id:
        raise InvalidRequest("Missing auth_req_id parameter.")
    return approval_collect(auth_req_id=auth_req_id, agent=agent, jkt=req.dpop_jkt, instance=req.instance)

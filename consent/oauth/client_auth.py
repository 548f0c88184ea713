"""Client (agent) authentication at the token and backchannel endpoints.

- ``client_secret_basic`` / ``client_secret_post`` (RFC 6749 §2.3.1): HTTP Basic is
  preferred; credentials in the form body are accepted too.
- ``private_key_jwt`` (RFC 7523 §2.2, OpenID Connect Core §9): a JWT the agent signs
  with one of its registered keys (``consent.oauth.private_key_jwt``).
- ``attest_jwt_client_auth`` (draft-ietf-oauth-attestation-based-client-auth): one instance of
  an agent, with a Client Attestation the agent's registered key signed for the instance's own
  key and a PoP by that key, in the ``OAuth-Client-Attestation`` headers
  (``consent.oauth.attestation``). Authenticating so names the instance (``InstanceProof``).
- ``none`` (RFC 7591 §2): public clients only (self-described agents that registered
  so), at the token endpoint's code and refresh grants; PKCE binds the code.

Parsing (``presented_credentials``) is separate from checking (``authenticate``), so a
grant that reads the agent's row together with its own (the code exchange reads the
code, its grant and its agent in one statement) can check the credentials against
that row without another query. Every failure is ``InvalidClient``: the client
learns nothing more (RFC 6749 §5.2); the reason goes to the audit row only.
"""

import hashlib
import hmac
from dataclasses import dataclass

from django.contrib.auth.hashers import check_password

from .. import rows
from ..errors import InvalidClient
from ..http import basic_credentials
from ..models import Agent
from .attestation import ATTEST_JWT_CLIENT_AUTH, InstanceProof, unverified_client_id, verify_instance
from .private_key_jwt import CLIENT_ASSERTION_TYPE, AssertionInvalid, unverified_issuer, verify_assertion

SECRET = "client_secret"
PRIVATE_KEY_JWT = "private_key_jwt"
# RFC 7591 §2 ``none``: a public client (a self-described native or browser agent) names itself only;
# PKCE (required for every code) binds the code to it. Never accepted for a confidential agent.
NONE = "none"
ATTEST = ATTEST_JWT_CLIENT_AUTH


@dataclass(frozen=True)
class Credentials:
    """What the request presented: ``method`` is ``client_secret``, ``private_key_jwt``,
    ``attest_jwt_client_auth`` or ``none``."""

    method: str
    client_id: str
    secret: str = ""
    assertion: str = ""
    attestation: str = ""  # OAuth-Client-Attestation
    pop: str = ""  # OAuth-Client-Attestation-PoP


def presented_credentials(
    params: dict[str, str], authorization: str, *, attestation: str | None = None, pop: str | None = None
) -> Credentials:
    """The credentials a token request carries; ``InvalidClient`` when there are none usable.

    ``attestation`` / ``pop``: the ``OAuth-Client-Attestation`` and ``-PoP`` headers, None when absent.
    An instance authenticates with them alone: no other client authentication beside them.
    """
    if attestation is not None or pop is not None:
        if not attestation or not pop:
            raise InvalidClient(reason="a client attestation needs both OAuth-Client-Attestation headers")
        if "client_assertion" in params or "client_secret" in params or authorization.startswith("Basic "):
            raise InvalidClient(
                reason="a client attestation and another client authentication in one request"
            )
        try:
            sub = unverified_client_id(attestation)
        except AssertionInvalid as exc:
            raise InvalidClient(reason=str(exc)) from exc
        claimed = params.get("client_id")
        if claimed and claimed != sub:
            raise InvalidClient(reason="client_id does not match the client attestation's sub")
        return Credentials(ATTEST, sub, attestation=attestation, pop=pop)
    if "client_assertion" in params or "client_assertion_type" in params:
        if params.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise InvalidClient(reason=f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}")
        assertion = params.get("client_assertion", "")
        try:
            issuer = unverified_issuer(assertion)
        except AssertionInvalid as exc:
            raise InvalidClient(reason=str(exc)) from exc
        claimed = params.get("client_id")
        if claimed and claimed != issuer:
            raise InvalidClient(reason="client_id does not match the assertion's issuer")
        return Credentials(PRIVATE_KEY_JWT, issuer, assertion=assertion)
    if authorization.startswith("Basic "):
        pair = basic_credentials(authorization)
        if pair is not None:
            return Credentials(SECRET, *pair)
    client_id, secret = params.get("client_id"), params.get("client_secret")
    if client_id and secret:
        return Credentials(SECRET, client_id, secret)
    if client_id and "client_secret" not in params:
        return Credentials(NONE, client_id)
    raise InvalidClient(reason="no client authentication")


def secret_matches(secret: str, encoded: str) -> bool:
    """Check a presented secret against its stored hash (``consent.hashers``: salted SHA-256)."""
    algorithm, _, rest = encoded.partition("$")
    if algorithm == "cs_sha256":
        salt, _, digest = rest.partition("$")
        mine = hashlib.sha256(f"{salt}${secret}".encode()).hexdigest()
        return hmac.compare_digest(mine, digest)
    return check_password(secret, encoded)  # any other hasher Django knows (older rows)


def _secret_ok(secret: str, agent: Agent) -> bool:
    if agent.hash_client_secret:
        return secret_matches(secret, agent.client_secret)
    return hmac.compare_digest(secret.encode(), agent.client_secret.encode())


def authenticate(credentials: Credentials, agent: Agent | None, *, endpoint_url: str) -> Agent:
    """Check ``credentials`` against ``agent`` (the row for ``credentials.client_id``, or None)."""
    return authenticate_client(credentials, agent, endpoint_url=endpoint_url)[0]


def authenticate_client(
    credentials: Credentials, agent: Agent | None, *, endpoint_url: str
) -> tuple[Agent, InstanceProof | None]:
    """``authenticate``, and which instance of the agent it was (None: the agent as one)."""
    if agent is None or agent.client_id != credentials.client_id or not agent.may_sign_in:
        raise InvalidClient(reason="unknown client or agent suspended")
    if credentials.method == ATTEST:
        try:
            return agent, verify_instance(
                credentials.attestation, credentials.pop, agent=agent, endpoint_url=endpoint_url
            )
        except AssertionInvalid as exc:
            raise InvalidClient(reason=str(exc)) from exc
    if credentials.method == NONE:
        if agent.client_type != Agent.CLIENT_PUBLIC:
            raise InvalidClient(reason="no client authentication")
    elif credentials.method == PRIVATE_KEY_JWT:
        try:
            verify_assertion(credentials.assertion, agent=agent, endpoint_url=endpoint_url)
        except AssertionInvalid as exc:
            raise InvalidClient(reason=str(exc)) from exc
    elif not (
        agent.client_type == Agent.CLIENT_CONFIDENTIAL
        and agent.client_secret
        and _secret_ok(credentials.secret, agent)
    ):
        raise InvalidClient(reason="wrong client secret")
    return agent, None


# What the protocol endpoints read of an agent (any other field loads on first use).
AGENT_FIELDS = [
    "id",
    "client_id",
    "name",  # name and publisher: the prompt a backchannel request pushes shows them
    "publisher",
    "client_secret",
    "hash_client_secret",
    "client_type",
    "authorization_grant_type",
    "status",
    "refresh_mode",
    "access_token_ttl",
    "require_dpop",
    "jwks",
    "redirect_uris",
    "allowed_scopes",
    "delegates",
    "max_grant_lifetime",
    "backchannel_client_notification_endpoint",
]
# The agent columns of a statement that reads its row under the alias ``a``.
AGENT_ROW = rows.Columns(Agent, "a", AGENT_FIELDS)


def agent_by_client_id(client_id: str) -> Agent | None:
    """The registry row for ``client_id`` (one statement, no ORM query building)."""
    row = rows.fetchone(
        f"SELECT {AGENT_ROW.sql} FROM {rows.table(Agent)} a WHERE a.client_id = %s", [client_id]
    )
    return None if row is None else rows.instance(Agent, AGENT_ROW.load(row))


def authenticate_request(credentials: Credentials, *, endpoint_url: str) -> Agent:
    """Authenticate against the registry (one query): for endpoints that read no other row first."""
    return authenticate(credentials, agent_by_client_id(credentials.client_id), endpoint_url=endpoint_url)


def authenticate_client_request(
    credentials: Credentials, *, endpoint_url: str
) -> tuple[Agent, InstanceProof | None]:
    """``authenticate_request``, and which instance it was."""
    return authenticate_client(
        credentials, agent_by_client_id(credentials.client_id), endpoint_url=endpoint_url
    )

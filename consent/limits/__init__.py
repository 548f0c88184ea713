"""Limits: request rates, attempts on secrets, and bounded input.

- ``consent.limits.store``: the counters, in Redis so every node shares them; each question is one
  Lua script, one round trip. Redis down: limits fail open for a moment (logged), the service
  keeps answering.
- ``consent.limits.middleware``: the rate-limit layer for HTTP (per client, user and source) and the
  attempt limit on client and resource-server secrets, one hook for every endpoint.
- ``consent.limits.attempts``: attempt limits with backoff for the secrets a person presents after
  signing in (fresh authentication before approving, TOTP codes).
- ``consent.limits.logins``: the password sign-in limit, django-axes with our backoff and answer.
- ``consent.limits.jsonbounds``: size and depth of JSON checked before it is parsed.
- ``consent.limits.websocket``: refused websocket handshakes (bad Origin, no session), audited.
- ``consent.limits.cache``: the Redis cache axes counts in, failing open.

Floods are counted, not audited row by row: the first refusal of a kind in its window leaves an
audit row (``store.first_refusal``, the ``first`` flag of ``store.hit``), every refusal is
counted in Redis and exported as ``countersign_limit_refusals`` on ``/metrics``.

Settings: ``COUNTERSIGN["RATE_LIMITS"]`` and ``COUNTERSIGN["ATTEMPT_LIMITS"]`` (``consent.conf``).
"""

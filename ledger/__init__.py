"""The audit ledger over HTTP, and what of it reads other apps' records.

``audit`` is the append-only, sealed log and depends on no other app of ours. What answers
resource servers and audit readers over HTTP (``ledger.api``: checkpoints, the events pull,
inclusion and consistency proofs, the proof of an approval), with the shared limits, error
rendering and resource-server authentication, lives here, above ``approvals``, as does
``audit_prove`` (its ``--approval`` reads approval requests).
"""

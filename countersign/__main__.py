"""Command line: ``python -m countersign hash [DETAILS]``, ``keygen`` and ``verify-receipt``.

``hash`` prints the action hash of an RFC 9396 ``authorization_details`` array
(base64url SHA-256 of its RFC 8785 canonical JSON), the value a resource server
sends as ``action_hash`` when it redeems an action token. DETAILS is the JSON
text; without it, it is read from standard input.

``keygen --private FILE`` makes an agent key pair (P-256, ES256): the private key
goes to FILE (PEM, mode 600), and the public JWK Set (RFC 7517 §5) an admin
registers with ``agent_create --jwks`` / ``agent_update --jwks`` is printed.

``verify-receipt FILE --jwks JWKS --issuer URL`` checks a signed receipt offline (exit 0 and
its claims as JSON; exit 1 and why not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .jsonbounds import depth_within
from .verifier import action_hash

MAX_INPUT = 64 * 1024


def _read(text: str | None) -> str:
    return text if text is not None else sys.stdin.read(MAX_INPUT + 1)


def _hash(args: argparse.Namespace) -> int:
    text = _read(args.details)
    if len(text) > MAX_INPUT:
        print("countersign hash: input too large", file=sys.stderr)
        return 2
    if not depth_within(text.encode()):
        print("countersign hash: JSON nested too deeply", file=sys.stderr)
        return 2
    try:
        details = json.loads(text)
    except ValueError as exc:
        print(f"countersign hash: not JSON ({exc})", file=sys.stderr)
        return 2
    if isinstance(details, dict):  # one detail object: hash it as the one-element array it stands for
        details = [details]
    if not isinstance(details, list) or not all(isinstance(d, dict) for d in details):
        print("countersign hash: expected a JSON array of objects (authorization_details)", file=sys.stderr)
        return 2
    print(action_hash(details))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from .dpop import DPoPKey

    key = DPoPKey.generate()
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(args.private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"countersign keygen: {args.private}: {exc.strerror}", file=sys.stderr)
        return 2
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    print(json.dumps({"keys": [{**key.jwk, "alg": key.alg, "use": "sig", "kid": key.jkt}]}))
    return 0


def _verify_receipt(args: argparse.Namespace) -> int:
    from .receipts import InvalidReceipt, load_jwks, verify_receipt

    try:
        with open(args.receipt) as fh:
            receipt = fh.read(64 * 1024)
        with open(args.jwks) as fh:
            jwks = load_jwks(fh.read(1024 * 1024))
    except (OSError, ValueError) as exc:
        print(f"countersign verify-receipt: {exc}", file=sys.stderr)
        return 2
    try:
        claims = verify_receipt(receipt, jwks=jwks, issuer=args.issuer)
    except InvalidReceipt as exc:
        print(f"countersign verify-receipt: NOT VALID: {exc.description}", file=sys.stderr)
        return 1
    print(json.dumps(claims, indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m countersign", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    hash_cmd = commands.add_parser("hash", help="the action hash of an authorization_details array")
    hash_cmd.add_argument("details", nargs="?", help="JSON text (default: standard input)")
    hash_cmd.set_defaults(run=_hash)
    keygen = commands.add_parser(
        "keygen", help="an agent key pair: private PEM to a file, public JWKS on stdout"
    )
    keygen.add_argument("--private", required=True, help="where to write the private key (must not exist)")
    keygen.set_defaults(run=_keygen)
    check = commands.add_parser("verify-receipt", help="verify a signed receipt offline against a JWKS")
    check.add_argument("receipt", help="the receipt file (as downloaded)")
    check.add_argument("--jwks", required=True, help="the issuer's JWKS, saved from its jwks_uri")
    check.add_argument("--issuer", required=True, help="the issuer the receipt must name")
    check.set_defaults(run=_verify_receipt)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

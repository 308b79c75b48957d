"""`meshserve dev-certs` and `meshserve mint-token`: development credentials for the public endpoint
(services/gateway/credentials.py makes them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.gateway.credentials import (
    DEFAULT_CREDENTIALS_DIR,
    DEFAULT_HOSTS,
    DEV_AUDIENCE,
    DEV_ISSUER,
    MAX_PRIORITIES,
    ensure_dev_tls,
    mint_token,
)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """`meshserve dev-certs` and `meshserve mint-token`."""
    certs = subparsers.add_parser("dev-certs", help="generate a development CA and server certificate for TLS")
    certs.add_argument("--dir", type=Path, default=DEFAULT_CREDENTIALS_DIR / "tls", help="where the PEM files go")
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help=f"name or address the certificate is for (repeatable; default {', '.join(DEFAULT_HOSTS)})",
    )
    certs.add_argument("--days", type=int, default=30, help="validity of the CA and certificate")

    def run_certs(args: argparse.Namespace) -> int:
        tls = ensure_dev_tls(args.dir, tuple(args.host or DEFAULT_HOSTS), args.days)
        print(f"ca: {tls.ca}\ncert: {tls.cert}\nkey: {tls.key}")
        print(f"serve with: meshserve up --tls-cert {tls.cert} --tls-key {tls.key}", file=sys.stderr)
        return 0

    certs.set_defaults(func=run_certs)

    mint = subparsers.add_parser("mint-token", help="print a development JWT for a tenant (for `up --auth jwt`)")
    mint.add_argument("--tenant", required=True, help="tenant name (the `tenant` and `sub` claims)")
    mint.add_argument("--ttl-s", type=int, default=3600, help="seconds until the token expires")
    mint.add_argument(
        "--max-priority",
        choices=MAX_PRIORITIES,
        help="the highest priority the tenant may use (without it: normal; HIGH is capped)",
    )
    mint.add_argument("--issuer", default=DEV_ISSUER)
    mint.add_argument("--audience", default=DEV_AUDIENCE)
    mint.add_argument(
        "--credentials-dir",
        type=Path,
        default=DEFAULT_CREDENTIALS_DIR,
        help="signing key and JWKS (created when missing)",
    )

    def run_mint(args: argparse.Namespace) -> int:
        try:
            print(
                mint_token(
                    args.credentials_dir,
                    args.tenant,
                    args.ttl_s,
                    args.issuer,
                    args.audience,
                    max_priority=args.max_priority,
                )
            )
        except ValueError as error:
            print(f"meshserve mint-token: {error}", file=sys.stderr)
            return 2
        return 0

    mint.set_defaults(func=run_mint)

"""The public endpoint's flags of `meshserve up`, turned into `render_envoy_config` options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.gateway.config import DEFAULT_MAX_REQUEST_BYTES, JwtAuth, TenantRateLimit, TlsFiles, build_descriptor_set
from services.gateway.credentials import (
    DEFAULT_CREDENTIALS_DIR,
    DEV_AUDIENCE,
    DEV_ISSUER,
    ensure_dev_tls,
    ensure_signing_key,
)


def add_endpoint_args(group: argparse._ArgumentGroup, *, local: bool) -> None:
    """The public endpoint's flags, the one definition `meshserve up` (`local`: files on this machine,
    development credentials by default) and `meshserve render-envoy` (paths as Envoy sees them in its
    container, nothing generated) share."""
    with_jwt = "" if local else " (with --auth jwt)"
    group.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate chain (with --tls-key)")
    group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    group.add_argument(
        "--auth",
        choices=["none", "jwt"],
        default="none",
        help="jwt: every call but health checks needs `authorization: Bearer <JWT>`",
    )
    group.add_argument(
        "--jwks",
        type=Path,
        help="JWKS file of the keys that sign accepted tokens"
        + (
            " (default with --auth jwt: the dev signing key's JWKS in --credentials-dir, as used by "
            "`meshserve mint-token`)"
            if local
            else with_jwt
        ),
    )
    group.add_argument("--jwt-issuer", default=DEV_ISSUER if local else None, help=f"required `iss` claim{with_jwt}")
    group.add_argument(
        "--jwt-audience",
        action="append",
        default=None,
        help="accepted `aud` value (repeatable" + (f"; default {DEV_AUDIENCE})" if local else "; with --auth jwt)"),
    )
    group.add_argument("--jwt-tenant-claim", default="tenant", help="claim naming the tenant (for rate limits)")
    group.add_argument(
        "--rate-limit-per-tenant",
        type=int,
        metavar="N",
        help="each tenant may start N generations per --rate-limit-interval-s (needs --auth jwt)",
    )
    group.add_argument(
        "--rate-limit-interval-s",
        type=int,
        default=60,
        help="the rate limit's interval; refused requests are told to retry after it (Retry-After on HTTP)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="refuse larger generation requests at Envoy (0: no limit)",
    )
    group.add_argument(
        "--rest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="REST/JSON: POST /v1/generate, streamed as newline-delimited JSON",
    )
    group.add_argument(
        "--grpc-web",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="accept gRPC-Web (application/grpc-web+proto, ...) from browsers",
    )


def add_public_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `meshserve up` for the public endpoint; `public_endpoint_options` turns them into
    `render_envoy_config` keyword arguments."""
    group = parser.add_argument_group("public endpoint (Envoy); see docs/public-endpoint.md")
    add_endpoint_args(group, local=True)
    group.add_argument(
        "--dev-tls",
        action="store_true",
        help="serve TLS with a development CA and certificate generated into the run directory "
        "(RUN_DIR/mesh-PORT/tls/ca.pem is what clients trust)",
    )
    group.add_argument(
        "--credentials-dir",
        type=Path,
        default=DEFAULT_CREDENTIALS_DIR,
        help="development signing key and JWKS (shared with `meshserve mint-token`)",
    )


def public_endpoint_options(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """`render_envoy_config` keyword arguments from `add_public_endpoint_args` flags. Generates what a
    development setup needs (dev certificates into run_dir/tls, the descriptor set into run_dir, a dev
    signing key and JWKS) and raises SystemExit with a message on inconsistent flags."""
    options: dict[str, Any] = {"grpc_web": args.grpc_web}
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.tls_cert and args.dev_tls:
        raise SystemExit("--dev-tls generates its own certificate: drop it or --tls-cert/--tls-key")
    if args.tls_cert:
        for path in (args.tls_cert, args.tls_key):
            if not path.is_file():
                raise SystemExit(f"TLS file not found: {path}")
        options["tls"] = TlsFiles(args.tls_cert.resolve(), args.tls_key.resolve())
    elif args.dev_tls:
        dev = ensure_dev_tls(run_dir / "tls")
        options["tls"] = TlsFiles(dev.cert.resolve(), dev.key.resolve(), dev.ca.resolve())
        print(f"meshserve: development TLS; clients trust {dev.ca}", file=sys.stderr, flush=True)
    if args.auth == "jwt":
        if args.jwks is not None:
            if not args.jwks.is_file():
                raise SystemExit(f"JWKS file not found: {args.jwks}")
            jwks = args.jwks
        else:
            jwks = ensure_signing_key(args.credentials_dir).jwks
        options["jwt"] = JwtAuth(
            jwks.resolve(), args.jwt_issuer, tuple(args.jwt_audience or [DEV_AUDIENCE]), args.jwt_tenant_claim
        )
    elif args.jwks is not None:
        raise SystemExit("--jwks needs --auth jwt")
    options.update(limit_options(args))
    if args.rest:
        options["rest_descriptor"] = build_descriptor_set(run_dir / "generation_service.pb").resolve()
    return options


def limit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The per-tenant rate limit and the request size limit from their flags, checked (SystemExit with a
    message): shared by `meshserve up` and `meshserve render-envoy`."""
    options: dict[str, Any] = {}
    if args.rate_limit_per_tenant is not None:
        if args.auth != "jwt":
            raise SystemExit("--rate-limit-per-tenant needs --auth jwt: the tenant is a claim of the verified token")
        try:
            options["rate_limit"] = TenantRateLimit(args.rate_limit_per_tenant, args.rate_limit_interval_s)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if args.max_request_bytes < 0:
        raise SystemExit("--max-request-bytes must be >= 0")
    if args.max_request_bytes:
        options["max_request_bytes"] = args.max_request_bytes
    return options

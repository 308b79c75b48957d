"""`meshserve render-envoy`: Envoy's config for containers, from the same template as `meshserve up`.

`meshserve up` renders services/gateway/envoy.yaml.j2 for processes on one machine (routers on 127.0.0.1 ports).
In containers the routers are a DNS name that resolves to every router (compose's service name, a
Kubernetes headless Service), so this command renders the same template with STRICT_DNS routers, the
admin port reachable by Prometheus inside the container network, and file paths as the image has them.
Every public-endpoint option of the template (TLS, JWT, per-tenant rate limits, REST/JSON, gRPC-Web, the
request size limit, circuit breakers and outlier detection, which are always on) is a flag here too.

    meshserve render-envoy [FLAGS] [--out FILE]      # one config, to stdout or FILE
    meshserve render-envoy --deploy [--check]        # (check) the configs committed under deploy/

The configs under deploy/ are rendered with the flags in DEPLOY_CONFIGS; tests/deploy/test_envoy_configs.py
fails when a committed file differs from its rendering (`make envoy-configs` rewrites them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.gateway.deploy import DEPLOY_CONFIGS, add_render_args, render, render_deploy_config

REPO = Path(__file__).resolve().parents[2]
"""The source checkout whose deploy/ files --deploy writes or checks."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render-envoy",
        help="render Envoy's config for containers (compose, Kubernetes) from the gateway's template",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_render_args(parser)
    parser.add_argument("--out", "-o", type=Path, help="write here instead of stdout")
    parser.add_argument(
        "--deploy",
        action="store_true",
        help=f"render every config under deploy/ ({', '.join(c.path for c in DEPLOY_CONFIGS)})",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --out or --deploy: write nothing, exit 1 when a file differs from its rendering",
    )
    parser.set_defaults(func=run)


def _write_or_check(path: Path, text: str, check: bool) -> bool:
    """True when `path` holds `text` (check) or was written."""
    if check:
        same = path.is_file() and path.read_text() == text
        if not same:
            print(f"{path}: differs from its rendering (run `make envoy-configs`)", file=sys.stderr)
        return same
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def run(args: argparse.Namespace) -> int:
    if args.deploy:
        if args.out:
            raise SystemExit("--deploy writes the files under deploy/: drop --out")
        results = [_write_or_check(REPO / c.path, render_deploy_config(c), args.check) for c in DEPLOY_CONFIGS]
        return 0 if all(results) else 1
    text = render(args)
    if args.out is None:
        if args.check:
            raise SystemExit("--check needs --out FILE (or --deploy)")
        sys.stdout.write(text)
        return 0
    return 0 if _write_or_check(args.out, text, args.check) else 1

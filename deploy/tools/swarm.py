#!/usr/bin/env python3
"""Deploys deploy/swarm/stack.yaml to a Docker Swarm, and removes it, after checking what would otherwise
leave a half-started stack behind: that this engine is a manager of an active Swarm, that the secrets
exist, and that an external Alertmanager, when one is named, answers. Python's standard library only, so
any manager node with python3 and the repository (or this folder) runs it.

    python3 deploy/tools/swarm.py deploy --stack meshserve --secrets DIR [--alertmanager-url URL] [-c FILE ...]
    python3 deploy/tools/swarm.py rm --stack meshserve

deploy: DIR holds server.pem, server-key.pem (the TLS certificate chain and key Envoy serves) and jwks.json
        (the keys whose tokens Envoy accepts); they become Swarm secrets. --alertmanager-url sends the alerts
        to that Alertmanager instead of the stack's own (Prometheus' config is rewritten for it). -c adds
        compose files merged over the stack file (as `docker stack deploy -c` does). The image variables of
        the stack file (MESHSERVE_IMAGE, ...) and MESHSERVE_PORT come from the environment.
rm:     `docker stack rm`, then waits until no service, container, network, secret or config of the stack is
        left (Swarm removes them in the background).
Exit status 1 with one sentence on stderr when a check fails; nothing has been deployed then.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1]
STACK_FILE = DEPLOY / "swarm" / "stack.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SECRET_FILES = ("server.pem", "server-key.pem", "jwks.json")
STACK_LABEL = "com.docker.stack.namespace"


class Refused(Exception):
    """A check failed: the message says what and how to fix it."""


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise Refused("no `docker` command: install Docker (Debian: apt-get install docker.io)") from None


def check_swarm_manager() -> None:
    """Refused unless this engine answers and is a manager of an active Swarm."""
    info = docker("info", "--format", "{{json .Swarm}}")
    if info.returncode != 0:
        raise Refused(f"no Docker daemon answers ({info.stderr.strip() or 'docker info failed'})")
    swarm = json.loads(info.stdout)
    state = swarm.get("LocalNodeState", "")
    if state != "active":
        raise Refused(
            f"this Docker engine is not part of a Swarm (state: {state or 'unknown'}): run `docker swarm init` "
            "on the first manager, or `docker swarm join` with the token it prints (deploy/README.md)"
        )
    if not swarm.get("ControlAvailable"):
        raise Refused("this node is a Swarm worker: deploy from a manager (`docker node ls` there lists the nodes)")


def check_secrets(directory: Path) -> None:
    missing = [name for name in SECRET_FILES if not (directory / name).is_file()]
    if missing:
        raise Refused(
            f"{directory} lacks {', '.join(missing)}: it needs {', '.join(SECRET_FILES)} "
            "(development ones: `meshserve dev-certs` and `meshserve mint-token`, deploy/README.md)"
        )


def alertmanager_target(url: str, timeout_s: float = 5.0) -> str:
    """host:port of an Alertmanager at `url` that answers /-/ready; Refused otherwise."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise Refused(f"--alertmanager-url {url!r} is not an http(s) URL")
    ready = f"{url.rstrip('/')}/-/ready"
    try:
        with urllib.request.urlopen(ready, timeout=timeout_s) as response:
            if response.status != 200:
                raise Refused(f"the Alertmanager at {url} is not ready ({ready} answered {response.status})")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise Refused(f"no Alertmanager answers at {url} ({ready}: {reason}); nothing was deployed") from None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.hostname}:{port}"


def prometheus_config_for(target: str, scheme: str, directory: Path) -> Path:
    """deploy/prometheus/prometheus.yml with its alerting block sending to `target` instead."""
    text = PROMETHEUS_CONFIG.read_text()
    block = re.search(r"^alerting:\n(?:[ #].*\n|\n)*?(?=^\S)", text, re.MULTILINE)
    if block is None:
        raise Refused(f"{PROMETHEUS_CONFIG} has no alerting block to replace")
    alerting = (
        f'alerting:\n  alertmanagers:\n  - scheme: {scheme}\n    static_configs:\n    - targets: ["{target}"]\n\n'
    )
    path = directory / "prometheus.yml"
    path.write_text(text[: block.start()] + alerting + text[block.end() :])
    return path


def deploy(args: argparse.Namespace) -> None:
    check_swarm_manager()
    secrets = args.secrets.resolve()
    check_secrets(secrets)
    env = {**os.environ, "MESHSERVE_SECRETS_DIR": str(secrets)}
    with tempfile.TemporaryDirectory(prefix="meshserve-swarm-") as scratch:
        if args.alertmanager_url:
            target = alertmanager_target(args.alertmanager_url)
            scheme = urllib.parse.urlsplit(args.alertmanager_url).scheme
            env["MESHSERVE_PROMETHEUS_CONFIG"] = str(prometheus_config_for(target, scheme, Path(scratch)))
        files = [arg for path in [STACK_FILE, *args.compose_file] for arg in ("-c", str(path))]
        command = ["docker", "stack", "deploy", "--prune", "--resolve-image", args.resolve_image, *files, args.stack]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise Refused(f"docker stack deploy failed: {result.stderr.strip() or result.stdout.strip()}")
    print(result.stdout, end="")


def leftovers(stack: str) -> dict[str, list[str]]:
    """What of `stack` Swarm still has, by kind."""
    label = f"label={STACK_LABEL}={stack}"
    found = {
        "services": docker("service", "ls", "-q", "--filter", label).stdout.split(),
        "containers": docker("ps", "-a", "-q", "--filter", label).stdout.split(),
        "networks": docker("network", "ls", "-q", "--filter", label).stdout.split(),
        "secrets": docker("secret", "ls", "-q", "--filter", label).stdout.split(),
        "configs": docker("config", "ls", "-q", "--filter", label).stdout.split(),
    }
    return {kind: ids for kind, ids in found.items() if ids}


def remove(args: argparse.Namespace, timeout_s: float = 180.0) -> None:
    check_swarm_manager()
    result = docker("stack", "rm", args.stack)
    if result.returncode != 0:
        raise Refused(f"docker stack rm failed: {result.stderr.strip()}")
    deadline = time.monotonic() + timeout_s
    while left := leftovers(args.stack):
        if time.monotonic() > deadline:
            raise Refused(f"{args.stack} still has {left} after {timeout_s:.0f} s")
        time.sleep(1)
    if args.volumes:  # named volumes are not the stack's to Swarm: each node keeps its own
        volumes = docker("volume", "ls", "-q", "--filter", f"label={STACK_LABEL}={args.stack}").stdout.split()
        if volumes:
            docker("volume", "rm", *volumes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/tools/swarm.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("deploy", help="check, then docker stack deploy deploy/swarm/stack.yaml")
    up.add_argument("--stack", default="meshserve", help="stack name (prefixes every service, secret, ...)")
    up.add_argument("--secrets", type=Path, required=True, help=f"folder with {', '.join(SECRET_FILES)}")
    up.add_argument("--alertmanager-url", help="send alerts to this Alertmanager (it must answer /-/ready)")
    up.add_argument("-c", "--compose-file", type=Path, action="append", default=[], help="extra compose file")
    up.add_argument(
        "--resolve-image",
        choices=["always", "changed", "never"],
        default="always",
        help="passed to docker stack deploy (never: images built on this node only, as the test does)",
    )
    down = commands.add_parser("rm", help="docker stack rm, and wait until nothing of the stack is left")
    down.add_argument("--stack", default="meshserve")
    down.add_argument("--volumes", action="store_true", help="also remove this node's volumes of the stack")
    args = parser.parse_args(argv)
    try:
        deploy(args) if args.command == "deploy" else remove(args)
    except Refused as error:
        print(f"deploy/tools/swarm.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

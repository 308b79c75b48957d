"""Runs Envoy as a container's main process and drains it on SIGTERM.

Envoy itself exits at once on SIGTERM, cutting every stream in flight. `docker compose stop` (and any
runtime without Kubernetes' preStop hook) sends SIGTERM and nothing else, so this wrapper turns it into
a drain first:

1. POST /drain_listeners?graceful&inboundonly on the admin port: HTTP/2 clients get a GOAWAY (no new
   streams on their connection) and the public listener stops accepting after --drain-time-s;
2. wait until no downstream request is active any more, or --drain-timeout-s has passed;
3. SIGTERM Envoy, and exit with its status.

    python envoy-entrypoint.py [--admin URL] [--drain-timeout-s S] -- envoy -c /etc/envoy/envoy.yaml ...

Standard library only: it runs with whatever Python the image has.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: envoy-entrypoint.py [options] -- envoy ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin", default="http://127.0.0.1:9901", help="Envoy's admin address")
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="longest wait for active requests to finish before Envoy is stopped",
    )
    parser.add_argument("--stat-prefix", default="public", help="the public listener's HTTP stat_prefix")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        raise SystemExit("envoy-entrypoint.py: no command after --")
    return args, command


def admin(url: str, method: str = "GET", timeout: float = 2.0) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as response:
        return response.read().decode()


def active_requests(args: argparse.Namespace) -> int:
    """Downstream requests open on the public listener (streams included), from Envoy's own stats."""
    name = f"http.{args.stat_prefix}.downstream_rq_active"
    text = admin(f"{args.admin}/stats?filter=^{name}$")
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise RuntimeError(f"Envoy reports no {name}")


def drain(args: argparse.Namespace, envoy: subprocess.Popen) -> None:
    deadline = time.monotonic() + args.drain_timeout_s
    try:
        admin(f"{args.admin}/drain_listeners?graceful&inboundonly", method="POST")
    except (OSError, urllib.error.URLError) as error:
        log(f"could not start the drain ({error}); stopping Envoy")
        return
    while envoy.poll() is None and time.monotonic() < deadline:
        try:
            active = active_requests(args)
        except (OSError, urllib.error.URLError, RuntimeError, ValueError) as error:
            log(f"could not read active requests ({error}); stopping Envoy")
            return
        if active == 0:
            log("drained: no active requests")
            return
        time.sleep(0.2)
    log(f"drain timeout ({args.drain_timeout_s:g} s) reached; stopping Envoy")


def log(message: str) -> None:
    print(f"envoy-entrypoint: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    args, command = parse_args(argv)
    stop = {"requested": False}

    def request_stop(signum, frame) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    envoy = subprocess.Popen(command)
    while envoy.poll() is None and not stop["requested"]:
        time.sleep(0.2)
    if envoy.poll() is None:
        log("SIGTERM: draining")
        drain(args, envoy)
        envoy.send_signal(signal.SIGTERM)
    return envoy.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

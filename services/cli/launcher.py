"""`meshserve up`: prepares the model and runs tokenizer, inference, router, the OpenAI-compatible service
and Envoy as separate processes in the foreground; Ctrl-C (or SIGTERM) stops them all cleanly."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.contract import check_version_name
from services.common.cpus import (
    CpuSetError,
    available_cpus,
    check_cpus,
    format_cpu_list,
    numa_nodes,
    parse_cpu_list,
    place_replicas,
)
from services.common.errors import InvalidArgumentError
from services.gateway.config import Endpoint, envoy_binary, parse_otlp_endpoint, public_channel, render_envoy_config
from services.gateway.flags import add_public_endpoint_args, public_endpoint_options
from services.modelstore.layout import add_models_root_arg
from services.modelstore.prepare import DEFAULT_PRECISION, PRECISIONS, prepare_model


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("up", help="prepare the model and run the whole mesh behind Envoy")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address of the public listener (Envoy); anything beyond loopback needs --auth jwt "
        "or --allow-unauthenticated",
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback --host without authentication (anyone who reaches it can use it)",
    )
    parser.add_argument("--port", type=int, default=8080, help="public gRPC port (Envoy)")
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port")
    parser.add_argument("--router-port", type=int, default=50051)
    parser.add_argument(
        "--router-admin-port",
        type=int,
        help="the routers' admin port (their RolloutService, for `meshserve rollout`); default: --router-port + 10",
    )
    parser.add_argument("--tokenizer-port", type=int, default=50052)
    parser.add_argument("--inference-port", type=int, default=50053)
    parser.add_argument("--openai-port", type=int, default=50054, help="OpenAI-compatible HTTP service")
    parser.add_argument(
        "--openai",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve the OpenAI-compatible API (/v1/chat/completions, ...) on the public port",
    )
    parser.add_argument(
        "--metrics-port-base",
        type=int,
        default=9100,
        help="metrics ports: router i at +1+10i, tokenizer +2, inference i at +3+10i, openai +4, fallback i at +5+10i",
    )
    parser.add_argument("--inference-replicas", type=int, default=1, help="inference processes (ports +100 apart)")
    parser.add_argument(
        "--inference-cpus",
        action="append",
        metavar="LIST|auto|none",
        help="pin inference replicas to cores: once per replica (--inference-cpus 0 --inference-cpus 1; the "
        "i-th set goes to replica i), or `auto`: the cores this process may use split among the replicas, "
        "per NUMA node where the machine has several; compute threads follow each set. Default: auto with "
        "several replicas (measured faster than sharing the cores: bench/pinning_rounds.sh), none with one",
    )
    parser.add_argument(
        "--router-replicas", type=int, default=1, help="router processes behind Envoy (ports +100 apart)"
    )
    parser.add_argument(
        "--fallback-replicas",
        type=int,
        default=0,
        help="inference processes of the lighter fallback tier (ports inference-port+50, +100 apart)",
    )
    parser.add_argument(
        "--fallback-precision",
        choices=PRECISIONS,
        default="int4",
        help="weights of the fallback tier (int4: lighter and faster than int8, lower quality; docs/benchmarks.md)",
    )
    parser.add_argument(
        "--fallback-arg",
        action="append",
        default=[],
        help="extra argument for the fallback tier's serve-inference, e.g. --fallback-arg=--num-slots=8",
    )
    parser.add_argument(
        "--model-version",
        action="append",
        default=[],
        metavar="NAME=PRECISION",
        help="serve a named model version side by side with the others (a rollout: canary, blue-green, A/B), "
        "--inference-replicas replicas each, e.g. --model-version blue=int8 --model-version green=int4; "
        "the first is the stable one. Each router's admin port (--router-admin-port) takes `meshserve rollout`",
    )
    parser.add_argument(
        "--rollout-weights",
        metavar="NAME=PERCENT,...",
        help="the versions' initial weights, e.g. blue=95,green=5 (default: all to the first version)",
    )
    parser.add_argument("--run-dir", type=Path, default=Path(".run"), help="rendered configs go here")
    parser.add_argument(
        "--inference-arg",
        action="append",
        default=[],
        help="extra argument for serve-inference, e.g. --inference-arg=--num-slots=8",
    )
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        help="extra argument for serve-router, e.g. --router-arg=--max-streams-per-tenant=8",
    )
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=DEFAULT_PRECISION, help="weights to prepare and serve"
    )
    add_models_root_arg(parser)
    add_public_endpoint_args(parser)
    parser.set_defaults(func=run)


def inference_threads_args(replicas: int) -> list[str]:
    """--threads for each of `replicas` inference processes sharing this machine's cores: more threads
    than cores in all leaves ONNX Runtime's spinning workers fighting over them (measured on two cores
    with two replicas: time to first token under load about halved with one thread each). One replica
    keeps ONNX Runtime's own choice, and MESHSERVE_INFERENCE_THREADS or an --inference-arg=--threads=N
    (later on the command line) wins."""
    if replicas <= 1 or os.environ.get("MESHSERVE_INFERENCE_THREADS"):
        return []
    return [f"--threads={max(1, len(os.sched_getaffinity(0)) // replicas)}"]


def inference_core_sets(
    spec: list[str] | None,
    replicas: int,
    available: frozenset[int] | None = None,
    nodes: dict[int, frozenset[int]] | None = None,
) -> list[str] | None:
    """The --cpus of each inference replica (cpulists), or None when they are not pinned. Without a spec,
    several replicas are placed as `auto` where there is a core for each (pinned replicas beat replicas
    sharing the cores at 1 and at 32 streams, bench/pinning_rounds.sh), and one replica is not pinned.
    Refuses (SystemExit, before anything starts) a set this machine does not have, overlapping sets, or
    a count that does not match the replicas."""
    available = available_cpus() if available is None else available
    if spec == ["none"] or (not spec and (replicas < 2 or len(available) < replicas)):
        return None
    spec = spec or ["auto"]
    try:
        if spec == ["auto"]:
            sets = place_replicas(replicas, available, numa_nodes() if nodes is None else nodes)
        else:
            if len(spec) != replicas:
                raise CpuSetError(
                    f"{len(spec)} core set(s) for {replicas} inference replica(s): give one --inference-cpus "
                    "per replica, or --inference-cpus auto"
                )
            sets = [parse_cpu_list(text) for text in spec]
            for cores in sets:
                check_cpus(cores, available)
            for i, cores in enumerate(sets):
                for j in range(i):
                    if cores & sets[j]:
                        raise CpuSetError(
                            f"replicas {j} and {i} would share core(s) {format_cpu_list(cores & sets[j])}: "
                            "pinned replicas get cores of their own"
                        )
    except CpuSetError as error:
        raise SystemExit(f"meshserve up: --inference-cpus: {error}") from None
    return [format_cpu_list(cores) for cores in sets]


def model_versions(specs: list[str]) -> list[tuple[str, str]]:
    """(name, precision) of each --model-version NAME=PRECISION; SystemExit naming the flag otherwise."""
    versions: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, precision = spec.partition("=")
        if not sep or precision not in PRECISIONS:
            raise SystemExit(
                f"meshserve up: --model-version {spec!r}: expected NAME=PRECISION, "
                f"PRECISION one of {', '.join(PRECISIONS)}"
            )
        try:
            check_version_name(name, "--model-version")
        except InvalidArgumentError as error:
            raise SystemExit(f"meshserve up: --model-version: {error.description}") from None
        if name in (v for v, _ in versions):
            raise SystemExit(f"meshserve up: --model-version: {name!r} is given twice")
        versions.append((name, precision))
    return versions


ADMIN_PORT_OFFSET = 10
"""A router's admin port (its RolloutService) is its gRPC port + this unless --router-admin-port says."""


def check_ports(ports: dict[str, int]) -> None:
    """Refuses, before anything starts, two listeners of the mesh on one port: gRPC servers bind with
    SO_REUSEPORT, so the second would start and take half of the first's connections."""
    owners: dict[int, str] = {}
    for name, port in ports.items():
        if port in owners:
            raise SystemExit(f"meshserve up: {name} and {owners[port]} are both port {port}: give each its own")
        owners[port] = name


def _fail_if_exited(procs: list[subprocess.Popen[bytes]]) -> None:
    """Start-up cannot succeed once one of the mesh's processes has exited: say which."""
    for proc in procs:
        if proc.poll() is not None:
            args = [str(a) for a in proc.args] if isinstance(proc.args, list | tuple) else [str(proc.args)]
            raise RuntimeError(f"{' '.join(args[3:5])} exited with {proc.returncode} during start-up")


def _wait_serving(target: str, service: str, deadline: float, procs: list[subprocess.Popen], tls=None) -> None:
    with public_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            _fail_if_exited(procs)
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become SERVING in time")
            time.sleep(0.2)


def check_exposure(host: str, auth: str, allow_unauthenticated: bool) -> str | None:
    """Refuses (SystemExit) a public listener beyond loopback that anyone could use; returns the warning
    to print when the operator allowed it anyway."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or auth == "jwt":
        return None
    risk = (
        f"--host {host} serves the model to anyone who can reach this machine, without authentication: "
        "they can use all of its capacity and read nothing back but their own answers"
    )
    if not allow_unauthenticated:
        raise SystemExit(
            f"meshserve up: {risk}. Add --auth jwt (see docs/public-endpoint.md), or "
            "--allow-unauthenticated to accept that."
        )
    return f"meshserve: WARNING: {risk} (--allow-unauthenticated)"


def _wait_http(url: str, deadline: float, procs: list[subprocess.Popen]) -> None:
    """Waits until GET `url` answers 200 (the OpenAI-compatible service's /health)."""
    while True:
        _fail_if_exited(procs)
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in time")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    warning = check_exposure(args.host, args.auth, args.allow_unauthenticated)
    versions = model_versions(args.model_version)
    if args.rollout_weights and not versions:
        raise SystemExit("meshserve up: --rollout-weights needs --model-version")
    # one entry per main-tier replica: (its version's name or "" without versions, its precision)
    main_replicas = [
        (name, precision)
        for name, precision in versions or [("", args.precision)]
        for _ in range(args.inference_replicas)
    ]
    core_sets = inference_core_sets(args.inference_cpus, len(main_replicas))  # before anything starts
    mp = args.metrics_port_base
    inference_ports = [args.inference_port + 100 * i for i in range(len(main_replicas))]
    fallback_ports = [args.inference_port + 50 + 100 * i for i in range(args.fallback_replicas)]
    router_ports = [args.router_port + 100 * i for i in range(args.router_replicas)]
    admin_base = args.router_admin_port if args.router_admin_port is not None else args.router_port + ADMIN_PORT_OFFSET
    admin_ports = [admin_base + 100 * i for i in range(args.router_replicas)]
    check_ports(
        {"--port (Envoy)": args.port, "--admin-port (Envoy's)": args.admin_port}
        | {f"router {i} (--router-port)": port for i, port in enumerate(router_ports)}
        | {f"router {i}'s admin port (--router-admin-port)": port for i, port in enumerate(admin_ports)}
        | {"--tokenizer-port": args.tokenizer_port}
        | {f"inference {i} (--inference-port)": port for i, port in enumerate(inference_ports)}
        | {f"fallback {i} (--inference-port + 50)": port for i, port in enumerate(fallback_ports)}
        | ({"--openai-port": args.openai_port} if args.openai else {})
        | {f"router {i}'s metrics (--metrics-port-base)": mp + 1 + 10 * i for i in range(len(router_ports))}
        | {"the tokenizer's metrics (--metrics-port-base)": mp + 2}
        | {f"inference {i}'s metrics (--metrics-port-base)": mp + 3 + 10 * i for i in range(len(inference_ports))}
        | ({"the openai service's metrics (--metrics-port-base)": mp + 4} if args.openai else {})
        | {f"fallback {i}'s metrics (--metrics-port-base)": mp + 5 + 10 * i for i in range(len(fallback_ports))}
    )
    if warning:
        print(warning, file=sys.stderr, flush=True)
    for precision in dict.fromkeys(p for _, p in main_replicas):
        prepare_model(args.models_root, precision)
    if args.fallback_replicas:
        prepare_model(args.models_root, args.fallback_precision)
    run_dir = args.run_dir / f"mesh-{args.port}"
    run_dir.mkdir(parents=True, exist_ok=True)
    endpoint_options = public_endpoint_options(args, run_dir)
    base = [sys.executable, "-m", "services.cli.main"]
    common = ["--host", "127.0.0.1", "--models-root", str(args.models_root)]
    threads = inference_threads_args(len(main_replicas) + args.fallback_replicas)
    fallback_threads = threads
    if core_sets:  # pinned: each replica's threads follow its own set; the fallback tier gets what is left
        threads = []
        fallback_threads = inference_threads_args(args.fallback_replicas)
    commands = {
        "tokenizer": base
        + ["serve-tokenizer", "--port", str(args.tokenizer_port), "--metrics-port", str(mp + 2), *common],
    }
    for i, port in enumerate(inference_ports):
        commands[f"inference-{i}"] = base + [
            "serve-inference",
            "--port",
            str(port),
            "--metrics-port",
            str(mp + 3 + 10 * i),
            *common,
            "--precision",
            main_replicas[i][1],
            *(["--model-version", main_replicas[i][0]] if versions else []),
            *threads,
            *(["--cpus", core_sets[i]] if core_sets else []),
            *args.inference_arg,
        ]
    for i, port in enumerate(fallback_ports):
        commands[f"fallback-{i}"] = base + [
            "serve-inference",
            "--port",
            str(port),
            "--metrics-port",
            str(mp + 5 + 10 * i),
            *common,
            "--precision",
            args.fallback_precision,
            *fallback_threads,
            *args.fallback_arg,
        ]
    if versions:
        targets = [
            arg
            for port, (name, _) in zip(inference_ports, main_replicas, strict=True)
            for arg in ("--model-version", f"{name}=127.0.0.1:{port}")
        ]
        targets += ["--rollout-weights", args.rollout_weights] if args.rollout_weights else []
    else:
        targets = [arg for port in inference_ports for arg in ("--inference-target", f"127.0.0.1:{port}")]
    targets += [arg for port in fallback_ports for arg in ("--fallback-target", f"127.0.0.1:{port}")]
    for i, port in enumerate(router_ports):
        commands[f"router-{i}"] = base + [
            "serve-router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(mp + 1 + 10 * i),
            "--tokenizer-target",
            f"127.0.0.1:{args.tokenizer_port}",
            "--admin-port",
            str(admin_ports[i]),
            *targets,
            *args.router_arg,
        ]
    if args.openai:
        commands["openai"] = base + [
            "serve-openai",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.openai_port),
            "--metrics-port",
            str(mp + 4),
            *[arg for port in router_ports for arg in ("--router-target", f"127.0.0.1:{port}")],
            "--tokenizer-target",
            f"127.0.0.1:{args.tokenizer_port}",
            # Envoy counts HTTP bodies, not WebSocket messages: the service holds those to the same limit
            "--max-request-bytes",
            str(args.max_request_bytes),
        ]
    procs: dict[str, subprocess.Popen] = {}
    stop = {"requested": False}

    def write_pids() -> None:
        (run_dir / "pids.json").write_text(json.dumps({name: proc.pid for name, proc in procs.items()}))

    def request_stop(signum, frame) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    try:
        deadline = time.monotonic() + args.startup_timeout_s
        for name, command in commands.items():
            procs[name] = subprocess.Popen(command)
        write_pids()
        for port in [args.tokenizer_port, *inference_ports, *fallback_ports, *router_ports]:
            _wait_serving(f"127.0.0.1:{port}", "", deadline, list(procs.values()))
        if args.openai:
            _wait_http(f"http://127.0.0.1:{args.openai_port}/health", deadline, list(procs.values()))
        config = run_dir / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                port=args.port,
                admin_port=args.admin_port,
                router_endpoints=[Endpoint("127.0.0.1", port) for port in router_ports],
                otlp=parse_otlp_endpoint(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")),
                listen_address=args.host,
                **endpoint_options,
                openai_endpoints=[Endpoint("127.0.0.1", args.openai_port)] if args.openai else None,
            )
        )
        procs["envoy"] = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(config),
                "--use-dynamic-base-id",
                "--log-level",
                "warn",
                "--log-path",
                str(run_dir / "envoy.log"),
            ]
        )
        _wait_serving(
            f"127.0.0.1:{args.port}",
            "meshserve.v1.GenerationService",
            deadline,
            list(procs.values()),
            tls=endpoint_options.get("tls"),
        )
        write_pids()
        print(f"meshserve is serving on {args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        # supervise: a process that dies is restarted (the router fails its streams over meanwhile)
        restarts: dict[str, list[float]] = {}
        while not stop["requested"]:
            for name, proc in list(procs.items()):
                if proc.poll() is None:
                    continue
                recent = [t for t in restarts.get(name, []) if t > time.monotonic() - 60]
                if len(recent) >= 3:
                    print(f"meshserve: {name} keeps exiting ({proc.returncode}); stopping", file=sys.stderr, flush=True)
                    stop["requested"] = True
                    code = 1
                    break
                print(f"meshserve: {name} exited with {proc.returncode}; restarting it", file=sys.stderr, flush=True)
                restarts[name] = recent + [time.monotonic()]
                procs[name] = subprocess.Popen(proc.args)
                write_pids()
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as error:
        print(f"meshserve: {error}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # Envoy first so no new streams arrive, then the router's clients, the router, then what it depends on
        order = sorted(
            procs,
            key=lambda name: ["envoy", "openai", "router", "tokenizer", "inference", "fallback"].index(
                name.split("-")[0]
            ),
        )
        for name in order:
            if procs[name].poll() is None:
                procs[name].send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
    return code

"""`meshserve rollout status|set|rollback`: the model versions' weights on running routers, through each
router's admin RolloutService (`serve-router --admin-port`; never the public endpoint).

Every router named (or every address a name resolves to, with `--discovery dns`) is asked first, so that
an unreachable one stops the change before any router has it; then each is set in turn, and each says what
it now does. A refused change (INVALID_ARGUMENT: an unknown version, weights that do not sum to 100) is
refused by the first router before anything changed anywhere, and reported in one sentence."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshserve.admin.v1 import rollout_service_pb2 as pb
from meshserve.admin.v1 import rollout_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgumentError
from services.router.replicas import join_target, split_target
from services.router.rollout import parse_weights

TIMEOUT_S = 5.0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("rollout", help="model versions side by side: weights, status, rollback")
    actions = parser.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="each router's versions, weights and replicas")
    change = actions.add_parser("set", help="new weights on every router, for new requests only")
    change.add_argument(
        "--weights", required=True, metavar="NAME=PERCENT,...", help="every version's percent, summing to 100"
    )
    change.add_argument("--stable", metavar="NAME", help="also make this version the one rollback returns to")
    rollback = actions.add_parser("rollback", help="all new requests to the stable version, at once")
    for action in (status, change, rollback):
        action.add_argument(
            "--router",
            action="append",
            required=True,
            metavar="HOST:PORT",
            help="a router's admin address (serve-router --admin-port; `meshserve up`: router port + 10); repeat",
        )
        action.add_argument(
            "--discovery",
            choices=("static", "dns"),
            default="static",
            help="dns: every address a --router name resolves to is a router (a headless Service)",
        )
        action.set_defaults(func=run)


def routers(names: list[str], discovery: str) -> list[str]:
    """The admin targets: as given, or every address of each name."""
    for name in names:
        _, port = split_target(name)
        if not 0 < int(port) < 65536:
            raise ValueError(f"--router {name}: the port must be 1..65535")
    if discovery == "static":
        return names
    found: list[str] = []
    for name in names:
        host, port = split_target(name)
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as error:
            raise ValueError(f"--router {name}: cannot resolve {host} ({error.strerror or error})") from None
        found += [join_target(address, port) for address in sorted({str(info[4][0]) for info in infos})]
    return found


def describe(rollout: pb.Rollout) -> str:
    versions = ", ".join(
        f"{v.name}={v.weight} ({v.replicas_serving}/{v.replicas_total} serving, {v.requests} requests)"
        for v in rollout.versions
    )
    return f"{versions}; stable {rollout.stable_version}"


def refusal(error: grpc.RpcError) -> str:
    """One sentence from a failed call: the field and why, for INVALID_ARGUMENT."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            violation = bad.field_violations[0]
            return f"{violation.field}: {violation.description}"
    return f"{error.code().name}: {error.details()}"


def run(args: argparse.Namespace) -> int:
    try:
        targets = routers(args.router, args.discovery)
        if args.action == "set":
            weights = parse_weights(args.weights, "--weights")
    except (ValueError, OSError) as error:
        print(f"meshserve rollout: {error}", file=sys.stderr)  # ValueError: one sentence naming the flag
        return 2
    except InvalidArgumentError as error:
        print(f"meshserve rollout: {error.field}: {error.description}", file=sys.stderr)
        return 2
    if not targets:
        print("meshserve rollout: no router found", file=sys.stderr)
        return 1
    channels = {target: grpc.insecure_channel(target) for target in targets}
    stubs = {target: pb_grpc.RolloutServiceStub(channel) for target, channel in channels.items()}
    try:
        # 1. every router answers, or none is changed
        states: dict[str, pb.Rollout] = {}
        for target, stub in stubs.items():
            try:
                states[target] = stub.GetRollout(pb.GetRolloutRequest(), timeout=TIMEOUT_S).rollout
            except grpc.RpcError as error:
                print(f"meshserve rollout: router {target}: {refusal(error)}; nothing changed", file=sys.stderr)
                return 1
        if args.action == "status":
            for target, state in states.items():
                print(f"{target}: {describe(state)}")
            return 0
        # 2. the change, router by router; the first refuses a bad one before any has it
        if args.action == "set":
            request = pb.SetWeightsRequest(
                weights=[pb.VersionWeight(name=name, weight=weight) for name, weight in weights.items()],
                stable_version=args.stable or "",
            )

            def call(stub: pb_grpc.RolloutServiceStub) -> pb.Rollout:
                return stub.SetWeights(request, timeout=TIMEOUT_S).rollout
        else:

            def call(stub: pb_grpc.RolloutServiceStub) -> pb.Rollout:
                return stub.Rollback(pb.RollbackRequest(), timeout=TIMEOUT_S).rollout

        return _apply(stubs, call)
    finally:
        for channel in channels.values():
            channel.close()


def _apply(
    stubs: dict[str, pb_grpc.RolloutServiceStub], call: Callable[[pb_grpc.RolloutServiceStub], pb.Rollout]
) -> int:
    done: list[str] = []
    for target, stub in stubs.items():
        try:
            state = call(stub)
        except grpc.RpcError as error:
            changed = f"changed on {', '.join(done)} only" if done else "nothing changed"
            print(f"meshserve rollout: router {target} refused: {refusal(error)} ({changed})", file=sys.stderr)
            return 1
        done.append(target)
        print(f"{target}: {describe(state)}")
    return 0

"""The inference replicas as the router sees them: health, load, and the choice for each request.

A background task polls every replica's health; each serving replica streams its load to the
router (WatchLoad: running, waiting, KV usage, sent as requests arrive and finish there). The router
adds its own in-flight count, which is exact for its own traffic and moves at once.

The replicas are either the targets as given (static discovery: one address per replica) or every
address the targets' names resolve to, re-resolved every few seconds (DNS discovery: a Swarm service with
`endpoint_mode: dnsrr`, a headless Kubernetes Service), so replicas that a scheduler adds or moves are
found without restarting the router.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.inference.v1 import inference_service_pb2 as pb
from meshserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.telemetry import client_interceptors

log = logging.getLogger(__name__)

PREFIX_BLOCK_TOKENS = 32
"""Prompts that share their first this-many tokens hash to the same preferred replica."""


@dataclass
class Replica:
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceServiceStub
    healthy: bool = False
    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    info: pb.GetModelInfoResponse | None = None  # fetched once it first serves
    in_flight_at_report: int = 0  # this router's in_flight when running/waiting were last reported
    load_watch: asyncio.Task[None] | None = None  # follows the replica's WatchLoad stream
    gone: bool = False  # its address left DNS: no new work; dropped once its in-flight calls end
    wrong_version: bool = False  # it reports another model version than its set's: no work

    @property
    def max_running(self) -> int:
        return self.info.max_running if self.info else 0

    @property
    def capacity(self) -> int:
        """Running slots plus queue places."""
        return self.info.max_running + self.info.max_waiting if self.info else 0

    @property
    def load(self) -> int:
        """Requests on this replica: the other routers' share of what it last reported, plus this
        router's own in-flight count, which is exact and current (a finished request frees its place
        at once, not at the next report)."""
        others = max(0, self.running + self.waiting - self.in_flight_at_report)
        return others + self.in_flight


def prefix_key(prompt_token_ids: list[int]) -> bytes:
    head = prompt_token_ids[:PREFIX_BLOCK_TOKENS]
    return hashlib.blake2b(str(head).encode(), digest_size=8).digest()


def choose_replica(replicas: list[Replica], key: bytes, exclude: set[str], affinity_slack: int = 2) -> Replica | None:
    """Prefix affinity weighed against load: the replica that rendezvous hashing prefers for this
    prompt prefix (where its KV blocks are likely cached) wins while it has a free slot and carries
    at most `affinity_slack` requests more than the least loaded healthy replica; a cached prefix
    saves one prefill, never worth waiting in a queue while another replica has room."""
    candidates = [r for r in replicas if r.healthy and not r.gone and r.target not in exclude]
    if not candidates:
        return None
    least = min(candidates, key=lambda r: (r.load, r.kv_cache_usage))
    preferred = max(candidates, key=lambda r: hashlib.blake2b(key + r.target.encode(), digest_size=8).digest())
    has_room = not preferred.max_running or preferred.load < preferred.max_running
    return preferred if has_room and preferred.load <= least.load + affinity_slack else least


LOAD_REPORT_TIMEOUT_S = 3.0
"""A replica's load stream sends at least one report a second; after this long without one the
router drops the stream and opens another."""


def _set_load(replica: Replica, load: pb.GetLoadResponse) -> None:
    replica.running, replica.waiting, replica.kv_cache_usage = load.running, load.waiting, load.kv_cache_usage
    replica.in_flight_at_report = replica.in_flight


def record_call_error(replica: Replica, code: grpc.StatusCode) -> None:
    """A call on `replica` ended with `code`. UNAVAILABLE (dead, or draining) takes it out of the
    choice until a health check passes again; RESOURCE_EXHAUSTED does not: a full replica is
    healthy, and its load ranks it last among the others (the request that met it tries those)."""
    if code == grpc.StatusCode.UNAVAILABLE:
        replica.healthy = False


# gRPC's default reconnect backoff grows to minutes; a replica restarting after a crash takes
# seconds, and the router should see it serving again within about a second of its return
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


DISCOVERY_CHOICES = ("static", "dns")

DNS_REFRESH_S = 2.0
"""How often DNS discovery resolves the targets' names again."""

Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve_addresses(host: str) -> list[str]:
    """Every address `host` resolves to (A and AAAA records), through the system resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def split_target(target: str) -> tuple[str, str]:
    """("name", "port") of "name:port"; ValueError naming the target otherwise."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {target!r}")
    return host.strip("[]"), port


def join_target(address: str, port: str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class ReplicaSet:
    def __init__(
        self,
        targets: tuple[str, ...],
        poll_interval_s: float = 0.25,
        discovery: str = "static",
        dns_refresh_s: float = DNS_REFRESH_S,
        resolver: Resolver = resolve_addresses,
        model_version: str = "",
    ) -> None:
        if discovery not in DISCOVERY_CHOICES:
            raise ValueError(f"discovery must be one of {DISCOVERY_CHOICES}, got {discovery!r}")
        self.replicas: list[Replica] = []
        self.model_version = model_version
        """The version these replicas must report serving (GetModelInfo.model_version); "": any."""
        self.names = tuple(targets) if discovery == "dns" else ()
        for name in self.names:
            split_target(name)  # a malformed target fails at start-up, not at the first resolution
        if discovery == "static":
            for target in targets:
                self._add(target)
        self.poll_interval_s = poll_interval_s
        self.dns_refresh_s = dns_refresh_s
        self._resolver = resolver
        self._resolved: dict[str, set[str]] = {}  # name -> the replica targets it resolved to last
        self._next_resolve = 0.0
        self._task: asyncio.Task[None] | None = None

    def _add(self, target: str) -> Replica:
        channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=client_interceptors())
        replica = Replica(target, channel, pb_grpc.InferenceServiceStub(channel))
        self.replicas.append(replica)
        return replica

    async def resolve(self) -> None:
        """DNS discovery: adds a replica for every new address of the targets' names; one whose address
        is gone takes no new work and is dropped when its last call ends (a draining replica finishes its
        streams first). A name that does not resolve keeps what it resolved to before: a lookup that
        fails is not a replica that left, and the health checks take dead ones out of the choice.
        Static targets are never resolved."""
        if not self.names:
            return
        for name in self.names:
            host, port = split_target(name)
            try:
                self._resolved[name] = {join_target(a, port) for a in await self._resolver(host)}
            except OSError as error:
                kept = len(self._resolved.get(name, ()))
                log.warning("cannot resolve %s (%s); keeping its %d replicas", name, error, kept)
        wanted = set().union(*self._resolved.values()) if self._resolved else set()
        known = {r.target for r in self.replicas}
        for target in sorted(wanted - known):
            log.info("inference replica %s found in DNS", target)
            self._add(target)
        for replica in list(self.replicas):
            replica.gone = replica.target not in wanted
            if replica.gone and replica.in_flight == 0:
                log.info("inference replica %s left DNS; dropping it", replica.target)
                self.replicas.remove(replica)
                if replica.load_watch:
                    replica.load_watch.cancel()
                await replica.channel.close()

    async def poll_once(self) -> None:
        if self.names and time.monotonic() >= self._next_resolve:
            await self.resolve()
            self._next_resolve = time.monotonic() + self.dns_refresh_s
        await asyncio.gather(*(self._poll(r) for r in self.replicas))

    async def _poll(self, replica: Replica) -> None:
        try:
            health = await health_pb2_grpc.HealthStub(replica.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            serving = health.status == health_pb2.HealthCheckResponse.SERVING
            if serving and replica.info is None:
                replica.info = await replica.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            serving = False
        if serving and self.model_version and replica.info and replica.info.model_version != self.model_version:
            # a replica of another version in this version's set would answer for the wrong version
            if not replica.wrong_version:  # logged once, not at every poll
                log.error(
                    "inference replica %s serves model version %r, not %r: it gets no work",
                    replica.target,
                    replica.info.model_version,
                    self.model_version,
                )
            replica.wrong_version = True
            replica.info = None  # asked again: the replica may be restarted with the right version
            serving = False
        elif serving:
            replica.wrong_version = False
        if serving and (replica.load_watch is None or replica.load_watch.done()):
            replica.load_watch = asyncio.get_running_loop().create_task(self._watch_load(replica))
        if serving != replica.healthy:
            log.info("inference replica %s is %s", replica.target, "serving" if serving else "not serving")
        replica.healthy = serving

    @staticmethod
    async def _watch_load(replica: Replica) -> None:
        """Follows the replica's load reports until the stream breaks; the next health poll that
        finds the replica serving starts another."""
        reports = replica.stub.WatchLoad(pb.WatchLoadRequest())
        try:
            while True:
                # reports come at least every second; a silent stream is a stuck or half-open one
                report = await asyncio.wait_for(reports.read(), LOAD_REPORT_TIMEOUT_S)
                if report is grpc.aio.EOF:
                    break
                _set_load(replica, report.load)
        except grpc.aio.AioRpcError as error:
            log.debug("load reports from %s ended: %s", replica.target, error.code().name)
        except TimeoutError:
            log.warning("no load report from %s for %.0f s; reconnecting", replica.target, LOAD_REPORT_TIMEOUT_S)
        finally:
            reports.cancel()
            # what it reported is of a replica that may be gone: a restarted one starts empty
            replica.running = replica.waiting = replica.in_flight_at_report = 0

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.poll_once()
                await asyncio.sleep(self.poll_interval_s)

        self._task = asyncio.get_running_loop().create_task(loop())

    @property
    def healthy(self) -> list[Replica]:
        """The replicas this router currently sends work to."""
        return [r for r in self.replicas if r.healthy and not r.gone]

    @property
    def capacity(self) -> int:
        return sum(r.capacity for r in self.healthy)

    @property
    def load(self) -> int:
        return sum(r.load for r in self.healthy)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for replica in self.replicas:
            if replica.load_watch:
                replica.load_watch.cancel()
            await replica.channel.close()

"""The inference replicas as the router sees them: health, load, and the choice for each request.

A background task polls every replica's health; each serving replica streams its load to the
router (WatchLoad: running, waiting, KV usage, sent as requests arrive and finish there). The router
adds its own in-flight count, which is exact for its own traffic and moves at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
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
    candidates = [r for r in replicas if r.healthy and r.target not in exclude]
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


class ReplicaSet:
    def __init__(self, targets: tuple[str, ...], poll_interval_s: float = 0.25) -> None:
        self.replicas = []
        for target in targets:
            channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=client_interceptors())
            self.replicas.append(Replica(target, channel, pb_grpc.InferenceServiceStub(channel)))
        self.poll_interval_s = poll_interval_s
        self._task: asyncio.Task[None] | None = None

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(r) for r in self.replicas))

    async def _poll(self, replica: Replica) -> None:
        try:
            health = await health_pb2_grpc.HealthStub(replica.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            serving = health.status == health_pb2.HealthCheckResponse.SERVING
            if serving and replica.info is None:
                replica.info = await replica.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            serving = False
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
        return [r for r in self.replicas if r.healthy]

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

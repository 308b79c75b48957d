"""The process skeleton every service shares: a grpc.aio server with health and reflection,
trace interceptors, a metrics endpoint, and graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.config_flags import add_config_args, config_from_args
from services.common.grpc_status import RejectUndecodableRequests
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.streams import RecordStreams, WriteStreams
from services.common.telemetry import server_interceptors, setup_tracing

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Where a service listens and how it stops."""

    host: str = "127.0.0.1"
    """Interface to bind (0.0.0.0 in containers)."""
    port: int = 0
    """gRPC port."""
    metrics_port: int = 0
    """Prometheus /metrics HTTP port (0: off)."""
    shutdown_grace_s: float = 30.0
    """How long in-flight streams may run after SIGTERM."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        return config_from_args(cls, args)


def add_server_args(
    parser: argparse.ArgumentParser, port: int, metrics_port: int, helps: dict[str, str] | None = None
) -> None:
    """`ServerConfig`'s flags, with this service's own ports as their defaults."""
    add_config_args(parser, ServerConfig, defaults={"port": port, "metrics_port": metrics_port}, helps=helps)


class ServiceProcess:
    """Runs one gRPC service until a signal asks it to drain."""

    def __init__(self, telemetry_name: str, config: ServerConfig) -> None:
        self.telemetry_name = telemetry_name
        self.config = config
        self.health = health.aio.HealthServicer()
        setup_logging(telemetry_name)
        self.tracer_provider = setup_tracing(telemetry_name)
        self.server = grpc.aio.server(
            # WriteStreams outermost and RecordStreams innermost: a cancelled stream closes in its own task
            interceptors=[WriteStreams(), RejectUndecodableRequests(), *server_interceptors(), RecordStreams()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._service_names: list[str] = []
        self._stopping = asyncio.Event()

    def add_service(self, full_name: str) -> None:
        self._service_names.append(full_name)

    async def _set_health(self, status: int) -> None:
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def run(
        self,
        warm_up: Callable[[], Awaitable[None]] | None = None,
        on_drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Binds, warms up (health NOT_SERVING until done), serves, and drains on SIGTERM/SIGINT:
        health turns NOT_SERVING at once, `on_drain` runs (the service's own drain: refuse new work,
        let running streams finish), then the server stops, cancelling what is left after the grace."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        bound = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        start_metrics_server(self.config.metrics_port, self.config.host)
        log.info(
            "%s listening on %s:%d (metrics %d)", self.telemetry_name, self.config.host, bound, self.config.metrics_port
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        if warm_up:
            await warm_up()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s ready", self.telemetry_name)
        await self._stopping.wait()
        log.info("draining for up to %.0fs", self.config.shutdown_grace_s)
        await self.health.enter_graceful_shutdown()
        if on_drain:
            await on_drain()
        await self.server.stop(self.config.shutdown_grace_s)
        self.tracer_provider.shutdown()
        log.info("%s stopped", self.telemetry_name)

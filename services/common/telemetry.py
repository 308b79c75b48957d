"""OpenTelemetry set-up shared by the services: one tracer provider per process, W3C trace
context on every gRPC hop, OTLP/gRPC export only when OTEL_EXPORTER_OTLP_ENDPOINT is set."""

from __future__ import annotations

import logging
import os

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

_HEALTH_SERVICE = "grpc.health.v1.Health"


def setup_tracing(service_name: str) -> TracerProvider:
    """Installs the global tracer provider. Without an OTLP endpoint, spans are made (so trace
    context still propagates) but never exported."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP to %s", endpoint)
    trace.set_tracer_provider(provider)
    return provider


# health checks, reflection and the router's load polling would bury real requests in Jaeger
_UNTRACED = filters.any_of(
    filters.service_name(_HEALTH_SERVICE),
    filters.service_prefix("grpc.reflection"),
    filters.method_name("GetLoad"),
    filters.method_name("WatchLoad"),
    filters.method_name("GetModelInfo"),
)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Continues the caller's trace for every RPC except health checks, reflection and load polling."""
    return [aio_server_interceptor(filter_=filters.negate(_UNTRACED))]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Injects the current trace context into outgoing calls (none for the untraced ones)."""
    return list(aio_client_interceptors(filter_=filters.negate(_UNTRACED)))

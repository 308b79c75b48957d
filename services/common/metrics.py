"""Prometheus metrics of a serving process. Names follow docs/conventions.md: units in the name,
`_total` on counters, a `model_name` label on everything."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import ClassVar, Self

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    60.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ServingMetrics:
    """The request-level metrics every generating service (router, inference), labelled with the model and
    the model version. One object owns the metric families; `for_version` gives a view bound to another
    version over the same families (a router serving versions side by side records each under its own)."""

    _LABELS: ClassVar[list[str]] = ["model_name", "model_version"]

    def __init__(self, model_name: str, model_version: str | None = "") -> None:
        """Bound to `model_version`; None: the families only, until `for_version` (no series is created
        for a version that never serves a request)."""
        labels = self._LABELS
        self._model_name = model_name
        self.model_version = ""
        self._ttft = Histogram(
            "meshserve_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            labels,
            buckets=_LATENCY_BUCKETS,
        )
        self._itl = Histogram(
            "meshserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            labels,
            buckets=_ITL_BUCKETS,
        )
        self._e2e = Histogram(
            "meshserve_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            labels,
            buckets=_E2E_BUCKETS,
        )
        self._prompt_tokens = Counter("meshserve_prompt_tokens", "Prompt tokens of accepted requests.", labels)
        self._generation_tokens = Counter("meshserve_generation_tokens", "Generated tokens.", labels)
        self._requests = Counter("meshserve_requests", "Finished requests by gRPC status code.", labels + ["code"])
        self._running = Gauge("meshserve_num_requests_running", "Requests being generated.", labels)
        if model_version is not None:
            self._bind(model_version)

    def _bind(self, model_version: str) -> None:
        self.model_version = model_version
        values = (self._model_name, model_version)
        self.time_to_first_token = self._ttft.labels(*values)
        self.inter_token_latency = self._itl.labels(*values)
        self.e2e_request_latency = self._e2e.labels(*values)
        self.prompt_tokens = self._prompt_tokens.labels(*values)
        self.generation_tokens = self._generation_tokens.labels(*values)
        self.num_requests_running = self._running.labels(*values)

    def for_version(self, model_version: str) -> Self:
        """These metrics bound to `model_version` (the same families)."""
        view = copy.copy(self)
        view._bind(model_version)
        return view

    def count_request(self, code: str) -> None:
        """One finished request; one refused before it was routed to a version counts under model_version ""."""
        self._requests.labels(self._model_name, self.model_version, code).inc()


class EngineMetrics(ServingMetrics):
    """ServingMetrics plus the queue of a process that queues requests (an inference replica). The
    router admits or refuses at once, so it does not export a queue that would always read zero."""

    def __init__(self, model_name: str, model_version: str | None = "") -> None:
        labels = self._LABELS
        self._queue_time = Histogram(
            "meshserve_request_queue_time_seconds",
            "Time a request waited before its prefill started.",
            labels,
            buckets=_LATENCY_BUCKETS,
        )
        self._waiting = Gauge("meshserve_num_requests_waiting", "Requests waiting to start.", labels)
        super().__init__(model_name, model_version)

    def _bind(self, model_version: str) -> None:
        super()._bind(model_version)
        self.request_queue_time = self._queue_time.labels(self._model_name, model_version)
        self.num_requests_waiting = self._waiting.labels(self._model_name, model_version)


# OpenTelemetry GenAI semantic conventions: bucket boundaries as the conventions specify them
_GEN_AI_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_GEN_AI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
GEN_AI_PROVIDER = "meshserve"


class GenAiMetrics:
    """The model-server metrics of the OpenTelemetry GenAI semantic conventions v0.1.0
    (`open-telemetry/semantic-conventions-genai`), named as the OpenTelemetry-to-Prometheus mapping names them
    (dots to underscores, the unit appended: `gen_ai.server.time_to_first_token` in seconds becomes
    `gen_ai_server_time_to_first_token_seconds`; `{token}` adds nothing), with the conventions' labels and
    meshserve's `model_version` (the conventions allow more attributes; versions side by side need it)."""

    _LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "model_version")

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._ttft = Histogram(
            "gen_ai_server_time_to_first_token",
            "Time to generate the first token (GenAI conventions).",
            self._LABELS,
            unit="seconds",
            buckets=_GEN_AI_TTFT_BUCKETS,
        )
        self._tpot = Histogram(
            "gen_ai_server_time_per_output_token",
            "Time per output token after the first (GenAI conventions).",
            self._LABELS,
            unit="seconds",
            buckets=_GEN_AI_TPOT_BUCKETS,
        )
        self._duration = Histogram(
            "gen_ai_server_request_duration",
            "Generation request duration (GenAI conventions).",
            [*self._LABELS, "error_type"],
            unit="seconds",
            buckets=_GEN_AI_DURATION_BUCKETS,
        )

    def _labels(self, operation: str, model_version: str) -> list[str]:
        return [operation, GEN_AI_PROVIDER, self.model_name, model_version]

    def first_token(
        self, operation: str, seconds: float, exemplar: dict[str, str] | None, model_version: str = ""
    ) -> None:
        self._ttft.labels(*self._labels(operation, model_version)).observe(seconds, exemplar)

    def finished(
        self,
        operation: str,
        seconds: float,
        error_type: str,
        exemplar: dict[str, str] | None,
        output_tokens: int = 0,
        first_token_s: float | None = None,
        model_version: str = "",
    ) -> None:
        """One request's end: its duration (error_type empty when it succeeded) and, once more than one
        token came, its time per output token after the first. Token counts are not a server metric of the
        conventions (v0.1.0 dropped even the client's `gen_ai.client.token.usage`): they are
        `meshserve_prompt_tokens_total` / `meshserve_generation_tokens_total`."""
        labels = self._labels(operation, model_version)
        self._duration.labels(*labels, error_type).observe(seconds, exemplar)
        if error_type:
            return
        if first_token_s is not None and output_tokens > 1:
            self._tpot.labels(*labels).observe((seconds - first_token_s) / (output_tokens - 1))


class _CounterReader:
    """Exports counters that another object keeps (e.g. on the engine thread) without locking it."""

    def __init__(
        self, model_name: str, model_version: str, counters: dict[str, tuple[str, Callable[[], float]]]
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (doc, read) in self.counters.items():
            family = CounterMetricFamily(name, doc, labels=["model_name", "model_version"])
            family.add_metric([self.model_name, self.model_version], read())
            yield family


def prefix_cache_counters(
    model_name: str, queries: Callable[[], float], hits: Callable[[], float], model_version: str = ""
) -> None:
    """`meshserve_prefix_cache_queries_total` / `_hits_total`: prompt tokens looked up / found cached."""
    REGISTRY.register(
        _CounterReader(
            model_name,
            model_version,
            {
                "meshserve_prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", queries),
                "meshserve_prefix_cache_hits": ("Prompt tokens found in the prefix cache.", hits),
            },
        )
    )


def kv_cache_usage_gauge(model_name: str, model_version: str = "") -> Gauge:
    gauge = Gauge(
        "meshserve_kv_cache_usage_perc", "Fraction of the KV cache in use (0..1).", ["model_name", "model_version"]
    )
    return gauge.labels(model_name, model_version)


def serving_replicas_gauge(model_name: str, reads: dict[str, Callable[[], float]]) -> None:
    """`meshserve_router_inference_replicas_serving{model_version}`: replicas a router currently sends work
    to, per model version (`reads`: version -> how many)."""
    gauge = Gauge(
        "meshserve_router_inference_replicas_serving",
        "Inference replicas this router sees serving.",
        ["model_name", "model_version"],
    )
    for version, read in reads.items():
        gauge.labels(model_name, version).set_function(read)


def degradation_metrics(model_name: str, shedding: Callable[[], float]) -> Counter:
    """`meshserve_router_shedding_low` (1 while LOW requests are shed) and the counter of requests the
    fallback tier served, `meshserve_fallback_requests_total{reason}`, which this returns."""
    gauge = Gauge(
        "meshserve_router_shedding_low", "1 while low-priority requests are shed under sustained load.", ["model_name"]
    )
    gauge.labels(model_name).set_function(shedding)
    return Counter(
        "meshserve_fallback_requests", "Requests served by the fallback tier, by why.", ["model_name", "reason"]
    )


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    """Serves /metrics over HTTP; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)

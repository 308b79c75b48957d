"""What one public Generate call records: the meshserve_* and gen_ai_* metrics (TTFT and duration with
the trace id as an exemplar, so a slow bucket leads to its trace) and a span named and attributed by the
OpenTelemetry GenAI conventions. Never prompt or output text: the conventions make message contents opt-in,
and meshserve does not record them at all."""

from __future__ import annotations

import time

from opentelemetry import trace

from meshserve.v1.generation_service_pb2 import Priority
from services.common.metrics import GEN_AI_PROVIDER, GenAiMetrics, ServingMetrics
from services.router.convert import GenerationRequest

tracer = trace.get_tracer("meshserve.router")


def _exemplar() -> dict[str, str] | None:
    context = trace.get_current_span().get_span_context()
    return {"trace_id": format(context.trace_id, "032x")} if context.is_valid and context.trace_flags.sampled else None


class RequestTelemetry:
    """Metrics and the GenAI span of one request, from arrival to its status."""

    def __init__(self, metrics: ServingMetrics, gen_ai: GenAiMetrics) -> None:
        self.metrics = metrics
        self.gen_ai = gen_ai
        self.started = time.monotonic()
        self.first_token_s: float | None = None
        self.last_token_at: float | None = None
        self.operation = "text_completion"
        self.prompt_tokens = self.completion_tokens = 0
        self.exemplar = _exemplar()
        self.span: trace.Span | None = None
        self.model_version = ""
        """The model version serving it, once routed ("" for a request refused before)."""

    def accepted(self, request: GenerationRequest) -> None:
        """The request passed the contract: open its GenAI span (a child of the Generate server span)."""
        self.operation = "chat" if request.chat is not None else "text_completion"
        model = self.gen_ai.model_name
        s = request.sampling
        attributes: dict[str, str | int | float] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.provider.name": GEN_AI_PROVIDER,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": s.max_tokens,
            "gen_ai.request.temperature": s.temperature,
            "gen_ai.request.top_p": s.top_p,
            "gen_ai.request.top_k": s.top_k,
            "meshserve.request_id": request.request_id,  # the conventions name only the response id
            "meshserve.priority": Priority.Name(request.priority),
        }
        if s.seed is not None:
            attributes["gen_ai.request.seed"] = s.seed
        self.span = tracer.start_span(f"{self.operation} {model}", attributes=attributes)

    def routed(self, model_version: str) -> None:
        """The request goes to `model_version`: its metrics and span say so from here on."""
        self.model_version = model_version
        self.metrics = self.metrics.for_version(model_version)
        if self.span is not None:
            self.span.set_attribute("meshserve.model.version", model_version)

    def tokens(self, count: int) -> None:
        now = time.monotonic()
        if self.last_token_at is None:
            self.first_token_s = now - self.started
            self.metrics.time_to_first_token.observe(self.first_token_s, self.exemplar)
            self.gen_ai.first_token(self.operation, self.first_token_s, self.exemplar, self.model_version)
        elif count:
            for _ in range(count):
                self.metrics.inter_token_latency.observe((now - self.last_token_at) / count)
        self.last_token_at = now

    def completed(
        self, request_id: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int
    ) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion_tokens)
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.started, self.exemplar)
        if self.span is not None:
            self.span.set_attributes(
                {
                    "gen_ai.response.id": request_id,
                    "gen_ai.response.model": self.gen_ai.model_name,
                    "gen_ai.response.finish_reasons": [finish_reason],
                    "gen_ai.usage.input_tokens": prompt_tokens,
                    "gen_ai.usage.output_tokens": completion_tokens,
                    "gen_ai.usage.cache_read.input_tokens": cached_prompt_tokens,
                }
            )

    def finished(self, code: str) -> None:
        """The call's status (a gRPC code name): counted, and the span ended (an error unless OK)."""
        self.metrics.count_request(code)
        error_type = "" if code == "OK" else code
        self.gen_ai.finished(
            self.operation,
            time.monotonic() - self.started,
            error_type,
            self.exemplar,
            self.completion_tokens,
            self.first_token_s,
            self.model_version,
        )
        if self.span is not None:
            if error_type:
                self.span.set_attribute("error.type", error_type)
                self.span.set_status(trace.Status(trace.StatusCode.ERROR))
            self.span.end()

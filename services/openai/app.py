"""The FastAPI app of the OpenAI-compatible service: HTTP in, `core` for the mapping, `upstream` for the
Generate calls. A request's choices run as parallel Generate calls read into one queue; a stream's HTTP
headers wait for every choice's first answer, so a refusal (400, 429, ...) is still an HTTP status. A client
that goes away (mid-stream, or while a non-streaming answer is generated) cancels the calls, which frees
their inference slots."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from meshserve.v1 import generation_service_pb2 as pb
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.openai import core
from services.openai.config import OpenAIConfig
from services.openai.upstream import RouterClient, TokenTexts, forwarded_metadata

log = logging.getLogger(__name__)
tracer = trace.get_tracer("meshserve.openai")

TIMEOUT_HEADER = "x-meshserve-timeout-s"
"""A deadline for the whole request, in seconds, passed to the router as the gRPC deadline."""
SDK_READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
"""What the openai SDKs send: how long they wait for a response. For a non-streaming request that is the
whole generation, so it becomes the deadline; a stream's read timeout is per event and is not used."""


def request_timeout(headers: Mapping[str, str], stream: bool) -> float | None:
    """The gRPC deadline (seconds) a request asks for, or None."""
    value = headers.get(TIMEOUT_HEADER)
    if value is not None:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 1e6:
            raise core.invalid(f"Invalid header {TIMEOUT_HEADER}: {value!r} is not a number of seconds > 0.", None)
        return seconds
    if not stream:
        with contextlib.suppress(TypeError, ValueError):
            seconds = float(headers.get(SDK_READ_TIMEOUT_HEADER))  # type: ignore[arg-type]
            if 0 < seconds < 1e6:
                return seconds
    return None


class _Ended:
    """Put on the queue when a choice's stream ends."""


class Generation:
    """The Generate calls of one plan, started at once and read concurrently into one queue."""

    def __init__(self, router: RouterClient, plan: core.Plan, metadata: list[tuple[str, str]], timeout_s: float | None) -> None:
        self.router = router
        self.queue: asyncio.Queue[tuple[int, pb.GenerateResponse | Exception | _Ended]] = asyncio.Queue()
        self.running = len(plan.requests)
        self.tasks = [asyncio.create_task(self._read(i, request, metadata, timeout_s))
                      for i, request in enumerate(plan.requests)]

    async def _read(self, index: int, request: pb.GenerateRequest, metadata: list[tuple[str, str]],
                    timeout_s: float | None) -> None:
        stream = self.router.generate(request, metadata, timeout_s)
        try:
            async for response in stream:
                self.queue.put_nowait((index, response))
            self.queue.put_nowait((index, _Ended()))
        except Exception as error:  # noqa: BLE001 - handed to the reader, which maps it to an HTTP error
            self.queue.put_nowait((index, error))
        finally:
            await stream.aclose()  # cancels the call if it is still running

    async def next(self) -> tuple[int, pb.GenerateResponse] | None:
        """The next response of any choice; None once every choice ended. A failed call raises its error."""
        while self.running:
            index, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, _Ended):
                self.running -= 1
                continue
            return index, item
        return None

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    # the body was read already, so the next ASGI message is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class OpenAIService:
    config: OpenAIConfig
    router: RouterClient
    texts: TokenTexts
    started: int
    requests: Any  # the labelled Counter family

    @classmethod
    def create(cls, config: OpenAIConfig) -> "OpenAIService":
        return cls(config, RouterClient(config), TokenTexts(config.tokenizer_target), int(time.time()), _requests_counter())

    async def model_name(self) -> str:
        return (await self.router.model_info()).model

    async def close(self) -> None:
        await self.router.close()
        await self.texts.close()


_COUNTER: Counter | None = None


def _requests_counter() -> Counter:
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = Counter("meshserve_openai_requests", "OpenAI-compatible API requests by endpoint and HTTP status.",
                           ["model_name", "endpoint", "code"])
    return _COUNTER


def _error_response(error: core.OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


class _Request:
    """The life of one API request: its span, its log line and its count, ended once whatever way it ends."""

    def __init__(self, service: OpenAIService, request: Request, endpoint: str) -> None:
        self.service = service
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.span = tracer.start_span(f"POST {request.url.path}", context=extract(request.headers), kind=SpanKind.SERVER,
                                      attributes={"http.request.method": "POST", "url.path": request.url.path})
        self.plan: core.Plan | None = None
        self.usage: dict[str, Any] | None = None
        self.ended = False

    @contextlib.contextmanager
    def in_span(self):
        token = otel_context.attach(trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, status: int, error: core.OpenAIError | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, error.code if error else None))
        self.span.end()
        plan = self.plan
        self.service.requests.labels(plan.model if plan else "", self.endpoint, str(status)).inc()
        usage = self.usage or {}
        # ids and counts only: never prompt or generated text
        log.info("%s %d choices=%d stream=%s prompt_tokens=%s completion_tokens=%s error=%s %.3fs", self.endpoint,
                 status, len(plan.requests) if plan else 0, plan.stream if plan else None, usage.get("prompt_tokens"),
                 usage.get("completion_tokens"), error.code if error else None, time.monotonic() - self.started,
                 extra={"request_id": plan.id if plan else ""})


async def _generate(service: OpenAIService, request: Request, endpoint: core.Endpoint) -> Response:
    life = _Request(service, request, f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}")
    generation: Generation | None = None
    try:
        body = await request.body()
        max_choices = service.config.max_choices
        if endpoint == "chat":
            chat = core.parse_chat(body)
            plan = core.plan_chat(chat, await service.model_name(), max_choices)
        else:
            completion = core.parse_completion(body)
            plan = core.plan_completion(completion, await service.model_name(), max_choices)
        life.plan = plan
        timeout_s = request_timeout(request.headers, plan.stream)
        with life.in_span():  # the calls' tasks carry the span, so the router's spans are its children
            generation = Generation(service.router, plan, forwarded_metadata(request.headers), timeout_s)
        builder = core.ResponseBuilder(plan)
        if plan.stream:
            first = await _first_answers(generation, len(plan.requests))
            return StreamingResponse(_stream(service, life, generation, builder, first), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-request-id": plan.id})
        await _collect(generation, builder, request)
        texts = await service.texts.lookup(
            {i for choice in builder.choices for item in choice.logprobs for i in (item.token_id, *(a.token_id for a in item.alternatives))})
        response = builder.body(texts)
        life.usage = response["usage"]
        life.end(200)
        return JSONResponse(response, headers={"x-request-id": plan.id})
    except ClientGone:
        life.end(499)
        return Response(status_code=499)
    except Exception as error:  # noqa: BLE001 - every failure is answered in OpenAI's shape
        if generation is not None:
            generation.cancel()
        mapped = core.to_openai_error(error, life.plan)
        if mapped.status == 500:
            log.error("internal error", exc_info=error, extra={"request_id": life.plan.id if life.plan else ""})
        life.end(mapped.status, mapped)
        return _error_response(mapped)


async def _first_answers(generation: Generation, choices: int) -> list[tuple[int, pb.GenerateResponse]]:
    """Reads until every choice answered once (its first chunk, or a refusal that raises)."""
    seen: set[int] = set()
    first = []
    while len(seen) < choices:
        event = await generation.next()
        if event is None:
            break
        first.append(event)
        seen.add(event[0])
    return first


async def _collect(generation: Generation, builder: core.ResponseBuilder, request: Request) -> None:
    async def consume() -> None:
        while (event := await generation.next()) is not None:
            builder.add(*event)

    consumer = asyncio.create_task(consume())
    disconnect = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({consumer, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not consumer.done():
            consumer.cancel()
            generation.cancel()
    if not consumer.done() or consumer.cancelled():
        raise ClientGone()
    consumer.result()


async def _stream(service: OpenAIService, life: _Request, generation: Generation, builder: core.ResponseBuilder,
                  first: list[tuple[int, pb.GenerateResponse]]) -> AsyncIterator[bytes]:
    """The server-sent events of a stream. If the client goes away, Starlette cancels this generator at
    its current await and `finally` cancels the Generate calls."""
    status, error = 499, None

    async def events() -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
        for event in first:
            yield event
        while (more := await generation.next()) is not None:
            yield more

    try:
        try:
            async for index, response in events():
                texts = await service.texts.lookup(core.logprob_token_ids(response)) if builder.plan.logprobs is not None else {}
                for chunk in builder.chunks(index, response, texts):
                    yield core.sse(chunk)
            for chunk in builder.final_chunks():
                yield core.sse(chunk)
            status = 200
            life.usage = builder.usage()
        except Exception as failure:  # noqa: BLE001 - the status was sent already: the error becomes an event
            error = core.to_openai_error(failure, builder.plan)
            status = error.status
            yield core.sse(error.body())
        yield core.SSE_DONE
    finally:
        generation.cancel()
        life.end(status, error)


def create_app(config: OpenAIConfig) -> FastAPI:
    """The app; the gRPC channels are opened when it starts and closed when it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = OpenAIService.create(config)
        try:
            yield
        finally:
            await app.state.service.close()

    # FastAPI's own OpenTelemetry spans, metrics and logs are off: one span per request is ours (_Request),
    # with the status the client got, and no library records request bodies (prompts) anywhere.
    app = FastAPI(title="meshserve OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _error_response(core.OpenAIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                                kind, None, "not_found" if error.status_code == 404 else None))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request.app.state.service, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request.app.state.service, request, "completion")

    async def model_info(request: Request) -> Any:
        try:
            return await request.app.state.service.router.model_info()
        except Exception as error:  # noqa: BLE001 - answered in OpenAI's shape
            return core.to_openai_error(error, None)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        info = await model_info(request)
        if isinstance(info, core.OpenAIError):
            return _error_response(info)
        return JSONResponse(core.models_list(info, request.app.state.service.started))

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> JSONResponse:
        info = await model_info(request)
        if isinstance(info, core.OpenAIError):
            return _error_response(info)
        if model.lower() != info.model.lower():
            return _error_response(core.OpenAIError(404, f"The model '{model}' does not exist.", "invalid_request_error",
                                                    "model", "model_not_found"))
        return JSONResponse(core.model_card(info, request.app.state.service.started))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness for the launcher and Envoy's health checks (not routed from the public port)."""
        return {"status": "ok"}

    return app

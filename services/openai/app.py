"""The FastAPI app of the OpenAI-compatible service: HTTP in, `core` for the mapping, `upstream` for the
Generate calls. A stream's HTTP headers wait for every choice's first answer, so a refusal (400, 429, ...)
is still an HTTP status. A client that goes away (mid-stream, while waiting for its first token, or for a
whole answer) cancels the calls, which frees their inference slots. The same streams are served over
WebSocket (`websocket` says how), with the same chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from meshserve.v1 import generation_service_pb2 as pb
from services.openai import core, responses
from services.openai import websocket as ws
from services.openai.config import MAX_BODY_BYTES, OpenAIConfig
from services.openai.schemas import ChatCompletionRequest
from services.openai.upstream import Generation, RouterClient, TokenTexts, forwarded_metadata

log = logging.getLogger(__name__)
tracer = trace.get_tracer("meshserve.openai")
T = TypeVar("T")

_REQUESTS: Counter | None = None


def _requests_counter() -> Counter:
    global _REQUESTS
    if _REQUESTS is None:  # one per process, however many apps (tests make several)
        _REQUESTS = Counter(
            "meshserve_openai_requests",
            "OpenAI-compatible API requests by endpoint and HTTP status.",
            ["model_name", "endpoint", "code"],
        )
    return _REQUESTS


@dataclass
class OpenAIService:
    """What the endpoints share: the gRPC clients, the start time (models' `created`), the request count."""

    config: OpenAIConfig
    router: RouterClient
    texts: TokenTexts
    started: int
    requests: Counter

    @classmethod
    def create(cls, config: OpenAIConfig) -> OpenAIService:
        return cls(
            config, RouterClient(config), TokenTexts(config.tokenizer_target), int(time.time()), _requests_counter()
        )

    async def model_info(self) -> pb.GetModelInfoResponse:
        try:
            return await self.router.model_info()
        except Exception as error:
            raise core.to_openai_error(error, None) from None

    async def close(self) -> None:
        await self.router.close()
        await self.texts.close()


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) if the client disconnects first. The body was
    read already, so the next ASGI message is the disconnect."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task not in done:  # the client left first: a cancelled task is still pending here, not cancelled()
        task.cancel()
        raise ClientGone()
    return task.result()


class _Life:
    """One API request's span, log line and count, ended once, however the request ends."""

    def __init__(self, service: OpenAIService, request: HTTPConnection, endpoint: str, method: str = "POST") -> None:
        self.service = service
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.span = tracer.start_span(
            f"{method} {request.url.path}",
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": request.url.path},
        )
        self.plan: core.Plan | None = None
        self.usage: dict[str, Any] = {}
        self.ended = False

    @contextlib.contextmanager
    def current(self):
        """The span as the current context: tasks started inside carry it, so the router's spans are its children."""
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
        # ids and counts only: never prompt or generated text
        log.info(
            "%s %d choices=%d stream=%s prompt_tokens=%s completion_tokens=%s error=%s %.3fs",
            self.endpoint,
            status,
            len(plan.requests) if plan else 0,
            plan.stream if plan else None,
            self.usage.get("prompt_tokens"),
            self.usage.get("completion_tokens"),
            error.code if error else None,
            time.monotonic() - self.started,
            extra={"request_id": plan.id if plan else ""},
        )


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends: a client that leaves before the
    body starts never runs the body generator's own `finally`."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None], request_id: str) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"cache-control": "no-cache", "x-request-id": request_id}
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _error_response(error: core.OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def _bounded_body(request: Request) -> bytes:
    too_large = core.OpenAIError(
        413,
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        "invalid_request_error",
        None,
        "request_too_large",
    )
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _generate(service: OpenAIService, request: Request, endpoint: core.Endpoint) -> Response:
    life = _Life(service, request, "/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    generation: Generation | None = None
    stream: _EventStream | None = None
    try:
        body = await _bounded_body(request)
        parsed = core.parse_chat(body) if endpoint == "chat" else core.parse_completion(body)
        model = (await service.model_info()).model
        plan = life.plan = core.plan(parsed, model, service.config.max_choices)
        timeout_s = core.request_timeout(request.headers, plan.stream)
        with life.current():
            generation = Generation(service.router, plan.requests, forwarded_metadata(request.headers), timeout_s)
        builder = core.ResponseBuilder(plan)
        if plan.stream:
            first = await _unless_client_leaves(request, generation.first_answers())

            def close(calls: Generation = generation) -> None:
                calls.cancel()
                life.end(499)  # unless the events ended it already

            stream = _EventStream(_events(service, life, _answers(generation, first), builder), close, plan.id)
            return stream
        await _unless_client_leaves(request, _collect(generation, builder))
        answer = builder.body(await service.texts.lookup(builder.logprob_token_ids()))
        life.usage = answer["usage"]
        life.end(200)
        return JSONResponse(answer, headers={"x-request-id": plan.id})
    except ClientGone:
        life.end(499)
        return Response(status_code=499)  # nobody reads it
    except Exception as error:
        mapped = core.to_openai_error(error, life.plan)
        if mapped.status == 500:
            log.error("internal error", exc_info=error, extra={"request_id": life.plan.id if life.plan else ""})
        life.end(mapped.status, mapped)
        return _error_response(mapped)
    finally:
        if generation is not None and stream is None:
            generation.cancel()  # a no-op for calls that ended; a stream's calls are _EventStream's to cancel


async def _collect(generation: Generation, builder: core.ResponseBuilder) -> None:
    while (event := await generation.next()) is not None:
        builder.add(*event)


async def _answers(
    generation: Generation, first: list[tuple[int, pb.GenerateResponse]]
) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    for event in first:
        yield event
    while (more := await generation.next()) is not None:
        yield more


async def _chunks(
    service: OpenAIService,
    answers: AsyncIterator[tuple[int, pb.GenerateResponse]],
    builder: core.ResponseBuilder,
) -> AsyncIterator[dict[str, Any]]:
    """A stream's chunks, the usage chunk last: the one conversion server-sent events and WebSocket frames share.
    A failed call raises its error."""
    async for index, response in answers:
        texts = (
            await service.texts.lookup(core.logprob_token_ids(response)) if builder.plan.logprobs is not None else {}
        )
        for chunk in builder.chunks(index, response, texts):
            yield chunk
    for chunk in builder.final_chunks():
        yield chunk


async def _events(
    service: OpenAIService,
    life: _Life,
    answers: AsyncIterator[tuple[int, pb.GenerateResponse]],
    builder: core.ResponseBuilder,
) -> AsyncIterator[bytes]:
    """The server-sent events of a stream. A client that goes away makes Starlette cancel this generator
    at its current await; `_EventStream` then cancels the calls."""
    status, error = 499, None
    try:
        async for chunk in _chunks(service, answers, builder):
            yield core.sse(chunk)
        status = 200
        life.usage = builder.usage()
    except Exception as failure:
        error = core.to_openai_error(failure, builder.plan)
        status = error.status
        yield core.sse(error.body())
    finally:
        life.end(status, error)
    yield core.SSE_DONE


def _parse_responses(body: bytes) -> tuple[responses.ResponsesRequest, ChatCompletionRequest]:
    request = core._parse(responses.ResponsesRequest, body, responses.RESPONSES_FIELDS)
    try:
        return request, responses.to_chat(request)
    except responses.ResponsesError as error:
        raise core.invalid(error.message, error.param) from None


def _as_responses_error(error: core.OpenAIError) -> core.OpenAIError:
    error.param = responses.responses_param(error.param)
    return error


async def _respond(service: OpenAIService, request: Request) -> Response:
    """POST /v1/responses: one chat generation, answered as a Response object or its stream of events."""
    life = _Life(service, request, "/v1/responses")
    generation: Generation | None = None
    stream: _EventStream | None = None
    try:
        body = await _bounded_body(request)
        asked, chat = _parse_responses(body)
        model = (await service.model_info()).model
        plan = life.plan = core.plan_chat(chat, model, 1)
        timeout_s = core.request_timeout(request.headers, plan.stream)
        with life.current():
            generation = Generation(service.router, plan.requests, forwarded_metadata(request.headers), timeout_s)
        builder = core.ResponseBuilder(plan)
        response_id = "resp_" + plan.id.removeprefix("chatcmpl-")
        if plan.stream:
            first = await _unless_client_leaves(request, generation.first_answers())

            def close(calls: Generation = generation) -> None:
                calls.cancel()
                life.end(499)

            translator = responses.EventTranslator(asked, response_id, model)
            events = _response_events(life, _answers(generation, first), builder, translator)
            stream = _EventStream(events, close, response_id)
            return stream
        await _unless_client_leaves(request, _collect(generation, builder))
        chat_body = builder.body({})
        life.usage = chat_body["usage"]
        life.end(200)
        return JSONResponse(responses.from_chat_body(asked, chat_body), headers={"x-request-id": response_id})
    except ClientGone:
        life.end(499)
        return Response(status_code=499)
    except Exception as error:
        mapped = _as_responses_error(core.to_openai_error(error, life.plan))
        if mapped.status == 500:
            log.error("internal error", exc_info=error, extra={"request_id": life.plan.id if life.plan else ""})
        life.end(mapped.status, mapped)
        return _error_response(mapped)
    finally:
        if generation is not None and stream is None:
            generation.cancel()


def _response_event(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\n".encode() + core.sse(event)


async def _response_events(
    life: _Life,
    answers: AsyncIterator[tuple[int, pb.GenerateResponse]],
    builder: core.ResponseBuilder,
    translator: responses.EventTranslator,
) -> AsyncIterator[bytes]:
    """The Responses stream: the chat chunks of the one choice, translated into Responses events."""
    status, error = 499, None
    try:
        for event in translator.start():
            yield _response_event(event)
        async for index, response in answers:
            for chunk in builder.chunks(index, response, {}):
                for event in translator.chunk(chunk):
                    yield _response_event(event)
        for event in translator.finish(builder.usage()):
            yield _response_event(event)
        status = 200
        life.usage = builder.usage()
    except Exception as failure:
        error = _as_responses_error(core.to_openai_error(failure, builder.plan))
        status = error.status
        failed = {"type": "error", "sequence_number": translator.sequence, **error.body()["error"]}
        yield _response_event(failed)
    finally:
        life.end(status, error)


# WebSocket streams


_SOCKET_GONE = (ClientGone, WebSocketDisconnect, WebSocketDisconnected, OSError)
"""What a socket whose client went away raises (reading or sending)."""


async def _request_frame(websocket: WebSocket, timeout_s: float) -> Message:
    try:
        message = await asyncio.wait_for(websocket.receive(), timeout_s)
    except TimeoutError:
        raise ws.request_timeout_error(timeout_s) from None
    if message["type"] == "websocket.disconnect":
        raise ClientGone()
    return message


async def _while_listening(websocket: WebSocket, work: Awaitable[None]) -> None:
    """Runs `work` (sending the stream) while reading the socket: a client that closes it (ClientGone) or sends
    another frame (a one-request-per-connection error) cancels `work` first. `work`'s own error is raised."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(websocket.receive())
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        message = listener.result()
    finally:
        for pending in (task, listener):
            pending.cancel()  # a no-op for the one that finished
        await asyncio.wait({task, listener})  # nothing else sends on the socket before `work` is gone
    if message["type"] == "websocket.disconnect":
        raise ClientGone()
    raise ws.second_request_error()


async def _send_chunks(
    service: OpenAIService, websocket: WebSocket, generation: Generation, builder: core.ResponseBuilder
) -> None:
    # Each send waits while the client's connection is congested, and Generation's queue is bounded: a slow
    # reader holds back its own calls (gRPC flow control), never grows a buffer here.
    async for chunk in _chunks(service, _answers(generation, []), builder):
        await websocket.send_text(core.event_json(chunk))


async def _socket(service: OpenAIService, websocket: WebSocket, endpoint: core.Endpoint) -> None:
    """One WebSocket: one request frame, its chunks, [DONE] and close 1000; or an error frame and a close code
    (`websocket.close_code`). The request counts, logs and traces as the HTTP endpoint's, with the status
    the same request would have had over HTTP."""
    await websocket.accept()
    life = _Life(service, websocket, ws.PATHS[endpoint], method="GET")
    generation: Generation | None = None
    try:
        message = await _request_frame(websocket, service.config.ws_request_timeout_s)
        parsed = ws.read_request(message, endpoint, service.config.ws_message_limit)
        model = (await service.model_info()).model
        plan = life.plan = core.plan(parsed, model, service.config.max_choices)
        timeout_s = core.request_timeout(websocket.headers, True)
        with life.current():
            generation = Generation(service.router, plan.requests, forwarded_metadata(websocket.headers), timeout_s)
        builder = core.ResponseBuilder(plan)
        await _while_listening(websocket, _send_chunks(service, websocket, generation, builder))
        life.usage = builder.usage()
        await websocket.send_text(ws.DONE)
        await websocket.close(ws.CLOSE_NORMAL)
        life.end(200)
    except _SOCKET_GONE:
        life.end(499)
    except Exception as failure:
        error = core.to_openai_error(failure, life.plan)
        if error.status == 500:
            log.error("internal error", exc_info=failure, extra={"request_id": life.plan.id if life.plan else ""})
        life.end(error.status, error)
        with contextlib.suppress(*_SOCKET_GONE):
            await websocket.send_text(ws.error_frame(error))
            await websocket.close(ws.close_code(error), ws.close_reason(error))
    finally:
        if generation is not None:
            generation.cancel()  # a no-op for calls that ended


def server_options(config: OpenAIConfig) -> dict[str, Any]:
    """uvicorn's WebSocket settings for `create_app(config)`: the `websockets` implementation (a missing one
    fails at start, not at the first upgrade), and a bound on every message read, so no client makes the
    service hold more than an HTTP body may be (the request limit itself is `ws_message_limit`, checked with
    an error frame). Pings every 20 s close a socket whose client stopped answering."""
    return {"ws": "websockets-sansio", "ws_max_size": MAX_BODY_BYTES, "ws_ping_interval": 20.0, "ws_ping_timeout": 20.0}


def create_app(config: OpenAIConfig) -> FastAPI:
    """The app; the gRPC channels are opened when it starts and closed when it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = OpenAIService.create(config)
        try:
            yield
        finally:
            await app.state.service.close()

    # FastAPI's own OpenTelemetry spans, metrics and logs are off: one span per request is ours (_Life),
    # with the status the client got, and no library records request bodies (prompts) anywhere.
    app = FastAPI(
        title="meshserve OpenAI-compatible API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )

    @app.exception_handler(core.OpenAIError)
    async def openai_error(request: Request, error: core.OpenAIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _error_response(
            core.OpenAIError(
                error.status_code,
                f"{request.method} {request.url.path}: {error.detail}",
                kind,
                None,
                "not_found" if error.status_code == 404 else None,
            )
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request.app.state.service, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request.app.state.service, request, "completion")

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        return await _respond(request.app.state.service, request)

    @app.websocket(ws.PATHS["chat"])
    async def chat_completions_socket(websocket: WebSocket) -> None:
        await _socket(websocket.app.state.service, websocket, "chat")

    @app.websocket(ws.PATHS["completion"])
    async def completions_socket(websocket: WebSocket) -> None:
        await _socket(websocket.app.state.service, websocket, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        service: OpenAIService = request.app.state.service
        return JSONResponse(core.models_list(await service.model_info(), service.started))

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> JSONResponse:
        service: OpenAIService = request.app.state.service
        info = await service.model_info()
        if model.lower() != info.model.lower():
            raise core.OpenAIError(
                404, f"The model '{model}' does not exist.", "invalid_request_error", "model", "model_not_found"
            )
        return JSONResponse(core.model_card(info, service.started))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness for the launcher and Envoy's health checks (not routed from the public port)."""
        return {"status": "ok"}

    return app

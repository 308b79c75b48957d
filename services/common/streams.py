"""Server streams that end in the task that ran them, however they end.

grpc.aio iterates a streaming handler's async generator in the RPC's task, but when the call is cancelled
(the client went away, its deadline passed, Envoy reset the stream) while a response is being written, the
generators are left suspended at their `yield` and never closed there: Python's garbage collector finalizes
them later, in a new task with a copy of whatever context was current then. Anything they undo in their
`finally` against the task's context breaks: OpenTelemetry's server interceptor detaches the span context it
attached and logs "Failed to detach context" at error level, and the servicer's own cleanup runs after the
span around it has ended.

`WriteStreams` (outermost) therefore turns every streaming handler into a coroutine that writes with
`context.write`: a cancellation then arrives as CancelledError in that coroutine, in the RPC's task, and it
closes the handler's generators there, innermost first. `RecordStreams` (innermost, inside the trace
interceptor) records the servicer's own generator, because the trace interceptor iterates it with a plain
`async for`, which does not close what it iterates. Every async generator of ours that iterates another one
closes it with `contextlib.aclosing`, so closing the outermost closes the chain.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

_opened: contextvars.ContextVar[list[AsyncGenerator[Any, Any]] | None] = contextvars.ContextVar(
    "meshserve_opened_streams", default=None
)


def _replace_streaming(handler: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    if handler is None or not handler.response_streaming:
        return handler
    if handler.request_streaming:
        return handler._replace(stream_stream=wrap(handler.stream_stream))
    return handler._replace(unary_stream=wrap(handler.unary_stream))


def _written(behavior: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
    async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
        opened: list[AsyncGenerator[Any, Any]] = []
        token = _opened.set(opened)
        responses = behavior(request, context)
        try:
            if inspect.isasyncgen(responses):
                async for response in responses:
                    await context.write(response)
            else:  # a handler that writes with context.write itself
                await responses
        finally:
            try:
                for stream in reversed(opened):  # the servicer's own first, while the spans around it are open
                    await stream.aclose()
                if inspect.isasyncgen(responses):
                    await responses.aclose()
            finally:
                _opened.reset(token)

    return written


def _recorded(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def recorded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        responses = behavior(request, context)
        opened = _opened.get()
        if opened is not None and inspect.isasyncgen(responses):
            opened.append(responses)
        return responses

    return recorded


class WriteStreams(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type information
    """The outermost interceptor: streaming handlers become coroutines that write with `context.write` and
    close their generators in the RPC's task."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any) -> Any:
        return _replace_streaming(await continuation(handler_call_details), _written)


class RecordStreams(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type information
    """The innermost interceptor: records the servicer's generator for `WriteStreams` to close."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any) -> Any:
        return _replace_streaming(await continuation(handler_call_details), _recorded)

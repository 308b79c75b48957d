"""Maps domain errors to gRPC statuses with google.rpc details (BadRequest, RetryInfo)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    AbortedError,
    DownstreamError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServingError,
    UnavailableError,
)

log = logging.getLogger(__name__)


def _retry_info(seconds: float) -> any_pb2.Any:
    detail = any_pb2.Any()
    whole = int(seconds)
    detail.Pack(
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
        )
    )
    return detail


def to_grpc_status(error: ServingError) -> grpc.Status:
    """The gRPC status a client receives for `error`."""
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgumentError):
        code = code_pb2.INVALID_ARGUMENT
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
                ]
            )
        )
        details.append(detail)
    elif isinstance(error, ResourceExhaustedError):
        code = code_pb2.RESOURCE_EXHAUSTED
        details.append(_retry_info(error.retry_after_s))
    elif isinstance(error, UnavailableError):
        code = code_pb2.UNAVAILABLE
        if error.retry_after_s is not None:
            details.append(_retry_info(error.retry_after_s))
    elif isinstance(error, AbortedError):
        code = code_pb2.CANCELLED
    elif isinstance(error, DownstreamError):
        code = getattr(code_pb2, error.code)
    else:
        code = code_pb2.INTERNAL
    return rpc_status.to_status(status_pb2.Status(code=code, message=str(error), details=details))


async def abort(context: grpc.aio.ServicerContext, error: ServingError) -> NoReturn:
    await context.abort_with_status(to_grpc_status(error))
    raise AssertionError("abort_with_status returned")  # it always raises AbortError


async def abort_internal(context: grpc.aio.ServicerContext, where: str) -> NoReturn:
    """Ends a call that hit a bug: the client gets INTERNAL with an id to quote, never the exception
    (its class name, or internal addresses in its message); the log gets the traceback under that id.
    Call it from an `except` block."""
    error_id = uuid.uuid4().hex[:16]
    log.exception("unhandled error %s in %s", error_id, where)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id})")
    raise AssertionError("abort returned")  # it always raises AbortError


_Method = TypeVar("_Method", bound=Callable[..., Any])


def grpc_errors(method: _Method) -> _Method:
    """Decorates a servicer method (coroutine or async generator): domain errors become their
    statuses, unexpected exceptions INTERNAL (logged with a traceback), cancellation passes."""

    async def _handle(exc: Exception, context: grpc.aio.ServicerContext) -> NoReturn:
        if isinstance(exc, ServingError):
            await abort(context, exc)
        await abort_internal(context, method.__qualname__)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                # closed here when this wrapper is closed (a cancelled call), not left to the garbage collector
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _handle(exc, context)

        return cast(_Method, stream_wrapper)

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _handle(exc, context)

    return cast(_Method, unary_wrapper)


# host:port of internal services (gRPC's transport errors name them): not for clients' eyes
_ADDRESS = re.compile(r"(?:\b(?:ipv4|ipv6|dns|unix):)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):\d{2,5}\b")


def scrub_addresses(message: str) -> str:
    return _ADDRESS.sub("<internal address>", message)


def from_rpc_error(error: grpc.aio.AioRpcError) -> ServingError:
    """Rebuilds the domain error a downstream service sent, so the router can pass it on (without
    internal addresses in its message)."""
    status = rpc_status.from_call(error)
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        for detail in status.details if status else []:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad) and bad.field_violations:
                v = bad.field_violations[0]
                return InvalidArgumentError(v.field, v.description)
        return InvalidArgumentError("request", error.details() or "invalid")
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        retry = None
        for detail in status.details if status else []:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                retry = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhaustedError(
                scrub_addresses(error.details() or "overloaded"), retry if retry is not None else 1.0
            )
        return UnavailableError(scrub_addresses(error.details() or "unavailable"), retry)
    return DownstreamError(code.name, scrub_addresses(error.details() or ""))


class _Undecodable:
    """What a request that does not parse becomes, so the handler can refuse it with a status."""


_UNDECODABLE = _Undecodable()


class RejectUndecodableRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type information
    """A request whose bytes do not parse (e.g. a string field that is not UTF-8, which any client can
    send) gets INVALID_ARGUMENT, where gRPC itself would answer UNKNOWN with the parser's class name.
    Covers unary requests (every call of ours but the streamed DecodeStream, whose ids cannot fail)."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:
                return _UNDECODABLE

        async def refuse(context: grpc.aio.ServicerContext) -> NoReturn:
            await abort(
                context,
                InvalidArgumentError("request", "the message does not parse (string fields must be valid UTF-8)"),
            )

        if handler.response_streaming:
            behavior = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if request is _UNDECODABLE:
                    await refuse(context)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async with contextlib.aclosing(result) as items:
                        async for item in items:
                            yield item
                else:  # a coroutine writing with context.write
                    await result

            return handler._replace(request_deserializer=tolerant, unary_stream=unary_stream)
        behavior = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is _UNDECODABLE:
                await refuse(context)
            return await behavior(request, context)

        return handler._replace(request_deserializer=tolerant, unary_unary=unary_unary)

"""Server interceptors for Kiln's own RPCs, in the order `server.py` installs them.

1. `RequestContextInterceptor` (outermost): takes `x-request-id` from the caller or makes
   one, puts it and the method in contextvars so every log line carries them, and returns it
   in the trailing metadata; puts the principal the gateway named (`x-kiln-principal`) in its
   contextvar for ownership, quotas and fairness.
2. `AccessLogMetricsInterceptor`: one log line and the RED metrics per call, naming the
   principal (never a credential: the servers do not see those); it sits outside the error
   mapping so that it sees the final status code.
3. `ErrorInterceptor` (innermost): turns `KilnError` into the call's rich status
   (`google.rpc.Status` with `ErrorInfo` and the error's details) and any unexpected
   exception into INTERNAL with only the request id; the traceback goes to the log.

Health and reflection pass through untouched: they must stay cheap, and their handlers
write to the context rather than yielding, which the wrappers here do not need to handle.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from grpc_status import rpc_status

from kiln_runtime.errors import RETRIABLE_HEADER, InternalError, KilnError
from kiln_runtime.principal import PRINCIPAL_HEADER, current_principal, set_principal
from kiln_runtime.redaction import public_status
from kiln_runtime.telemetry.logging import request_id_var, rpc_var
from kiln_runtime.telemetry.metrics import ServiceMetrics

log = logging.getLogger("kiln.access")

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]

REQUEST_ID_HEADER = "x-request-id"
#: Longest principal name accepted; gateways send client names and JWT subjects, far shorter.
MAX_PRINCIPAL_CHARS = 256
_KILN_PREFIX = "/kiln."


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary and server-streaming handlers of Kiln's own methods."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(_KILN_PREFIX):
            return handler
        # grpc.aio hands over the servicer's coroutine and async-generator methods as they are;
        # the sync-typed stubs do not know that, hence the casts.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(cast(UnaryBehavior, handler.unary_unary), method, handler_call_details),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self.wrap_stream(cast(StreamBehavior, handler.unary_stream), method, handler_call_details),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def wrap_unary(self, behavior: UnaryBehavior, method: str, details: grpc.HandlerCallDetails) -> UnaryBehavior:
        raise NotImplementedError

    def wrap_stream(self, behavior: StreamBehavior, method: str, details: grpc.HandlerCallDetails) -> StreamBehavior:
        raise NotImplementedError


class RequestContextInterceptor(_WrappingInterceptor):
    """Request id, method and principal into contextvars; the request id into trailing metadata."""

    async def _enter(
        self, method: str, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        metadata = dict(details.invocation_metadata or ())
        supplied = metadata.get(REQUEST_ID_HEADER)
        request_id = supplied if isinstance(supplied, str) and 0 < len(supplied) <= 128 else uuid.uuid4().hex
        request_id_var.set(request_id)
        rpc_var.set(method)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        principal = metadata.get(PRINCIPAL_HEADER, "")
        problem = _principal_problem(principal)
        if problem:
            # Only the gateway sets the header; a bad value is a misconfigured caller, not a user.
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the {PRINCIPAL_HEADER} header {problem}",
                trailing_metadata=((REQUEST_ID_HEADER, request_id),),
            )
        set_principal(principal if isinstance(principal, str) else "")

    def wrap_unary(self, behavior: UnaryBehavior, method: str, details: grpc.HandlerCallDetails) -> UnaryBehavior:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._enter(method, details, context)
            return await behavior(request, context)

        return unary

    def wrap_stream(self, behavior: StreamBehavior, method: str, details: grpc.HandlerCallDetails) -> StreamBehavior:
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await self._enter(method, details, context)
            async for response in behavior(request, context):
                yield response

        return stream


def _principal_problem(principal: object) -> str:
    """Why a principal header value cannot name a principal; "" if it can (absent = anonymous)."""
    if not isinstance(principal, str):
        return "must be text"
    if len(principal) > MAX_PRINCIPAL_CHARS:
        return f"is {len(principal)} characters long; at most {MAX_PRINCIPAL_CHARS}"
    if not principal.isprintable():
        return "contains control characters"
    return ""


class AccessLogMetricsInterceptor(_WrappingInterceptor):
    """One access-log line and the request metrics per call, with the final status code."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def _finish(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None, started: float
    ) -> None:
        code = _final_code(context, error)
        seconds = time.perf_counter() - started
        short = method.rsplit("/", 1)[-1]
        self.metrics.observe_request(short, code.name, seconds)
        self.metrics.in_progress.labels(service=self.metrics.service, method=short).dec()
        principal = current_principal()
        log.info(
            "%s %s %.1f ms principal=%s",
            method,
            code.name,
            seconds * 1000,
            principal,
            extra={"kiln": {"code": code.name, "duration_ms": round(seconds * 1000, 2), "principal": principal}},
        )

    def _start(self, method: str) -> float:
        short = method.rsplit("/", 1)[-1]
        self.metrics.in_progress.labels(service=self.metrics.service, method=short).inc()
        return time.perf_counter()

    def wrap_unary(self, behavior: UnaryBehavior, method: str, details: grpc.HandlerCallDetails) -> UnaryBehavior:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = self._start(method)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as err:
                error = err
                raise
            finally:
                self._finish(method, context, error, started)

        return unary

    def wrap_stream(self, behavior: StreamBehavior, method: str, details: grpc.HandlerCallDetails) -> StreamBehavior:
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = self._start(method)
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as err:
                error = err
                raise
            finally:
                self._finish(method, context, error, started)

        return stream


class ErrorInterceptor(_WrappingInterceptor):
    """Domain errors to rich statuses; anything else to INTERNAL without internals."""

    def __init__(self, domain: str) -> None:
        self.domain = domain

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], err: Exception) -> None:
        request_id = request_id_var.get()
        if not isinstance(err, KilnError):
            log.error("unhandled error in %s", rpc_var.get(), exc_info=err)
            err = InternalError(request_id or "unknown")
        # Messages built from exceptions may name server folders; clients get the names only.
        status = rpc_status.to_status(public_status(err.to_status(self.domain)))
        # abort replaces the trailing metadata, so the request id set earlier goes in again.
        extra: tuple[tuple[str, str], ...] = ((REQUEST_ID_HEADER, request_id),) if request_id else ()
        if err.retriable:
            extra = (*extra, (RETRIABLE_HEADER, "true"))
        extra = (*extra, *err.trailers())
        await context.abort(status.code, status.details, trailing_metadata=(*status.trailing_metadata, *extra))

    def wrap_unary(self, behavior: UnaryBehavior, method: str, details: grpc.HandlerCallDetails) -> UnaryBehavior:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as err:
                await self._abort(context, err)
                raise  # unreachable: abort raises

        return unary

    def wrap_stream(self, behavior: StreamBehavior, method: str, details: grpc.HandlerCallDetails) -> StreamBehavior:
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as err:
                await self._abort(context, err)

        return stream


def _final_code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    # grpc.aio reports the code set by abort() as a StatusCode or, in some versions, an int.
    code: object = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK

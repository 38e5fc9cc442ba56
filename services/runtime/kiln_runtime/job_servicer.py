"""The gRPC methods every model service's servicer has: convert, delegate, convert back.

Both services' RPCs have the same names and shapes (`Generate`, `GetInfo` and the job
methods); only the message classes, the request conversion and the parameter ranges differ,
and those are passed in. The generated `add_<Name>ProviderServicer_to_server` looks the
methods up by name, so one class serves both.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from kiln_runtime import convert as common
from kiln_runtime.job_api import JobRpcs
from kiln_runtime.jobs import RunnerEvent
from kiln_runtime.runtime import Runtime

Context = grpc.aio.ServicerContext[Any, Any]


class GeneratingService(Protocol):
    """A model service (`ModelService` subclass) as its servicer sees it."""

    runtime: Runtime

    def generate(self, job: Any, *, time_remaining: Callable[[], float | None]) -> AsyncIterator[RunnerEvent]: ...


class JobMethods:
    """WatchJob, GetJob, CancelJob and ListJobs (thin: the work is in `job_api`)."""

    service: GeneratingService

    @property
    def _jobs(self) -> JobRpcs:
        return self.service.runtime.job_rpcs

    async def WatchJob(self, request: Any, context: Context) -> AsyncIterator[Any]:  # noqa: N802 - gRPC name
        async for response in self._jobs.watch(request):
            yield response

    async def GetJob(self, request: Any, context: Context) -> Any:  # noqa: N802 - gRPC method name
        return await self._jobs.get(request)

    async def CancelJob(self, request: Any, context: Context) -> Any:  # noqa: N802 - gRPC method name
        return await self._jobs.cancel(request)

    async def ListJobs(self, request: Any, context: Context) -> Any:  # noqa: N802 - gRPC method name
        return await self._jobs.list(request)


class ModelServicer(JobMethods):
    """One model service's whole gRPC surface: Generate and GetInfo here, the job methods inherited."""

    def __init__(
        self,
        service: GeneratingService,
        *,
        job_from_request: Callable[[Any], Any],
        info_response: Callable[..., Any],
        parameters: Callable[[Runtime], Any],
    ) -> None:
        """Serve `service` with the service's own conversions.

        Args:
            service: Runs the jobs.
            job_from_request: The service's `convert.job_from_request` (validates, or raises InvalidArgument).
            info_response: The service's generated `GetInfoResponse` class.
            parameters: The `ParameterRanges` GetInfo reports, which may depend on the loaded provider.
        """
        self.service = service
        self._job_from_request = job_from_request
        self._info_response = info_response
        self._parameters = parameters

    async def Generate(self, request: Any, context: Context) -> AsyncIterator[Any]:  # noqa: N802 - gRPC name
        job = self._job_from_request(request)
        events = self.service.generate(job, time_remaining=deadline(context))
        async for response in self.service.runtime.job_rpcs.generate(request, events):
            yield response

    async def GetInfo(self, request: Any, context: Context) -> Any:  # noqa: N802 - gRPC method name
        runtime = self.service.runtime
        return self._info_response(
            model=common.model_info(runtime.manager, storage_refusal=runtime.runner.storage_refusal()),
            limits=common.server_limits(runtime.settings, runtime.admission, runtime.runner.max_inline_bytes),
            parameters=self._parameters(runtime),
        )


def deadline(context: Context) -> Callable[[], float | None]:
    """Seconds left of the call's deadline, still right after the call itself has ended.

    The job outlives its stream; its deadline does not move with it.
    """
    remaining: float | None = context.time_remaining()  # None without a deadline (the stubs omit it)
    if remaining is None:
        return lambda: None
    end = time.monotonic() + remaining
    return lambda: end - time.monotonic()

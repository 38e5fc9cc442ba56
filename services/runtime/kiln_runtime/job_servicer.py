"""The job methods every model service's servicer shares (thin: the work is in `job_api`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kiln_runtime.job_api import JobRpcs

Context = grpc.aio.ServicerContext[Any, Any]


class JobMethods:
    """WatchJob, GetJob, CancelJob and ListJobs; mixed in before the generated servicer base."""

    service: Any  # the service, whose `runtime.job_rpcs` answers

    @property
    def _jobs(self) -> JobRpcs:
        rpcs: JobRpcs = self.service.runtime.job_rpcs
        return rpcs

    async def WatchJob(self, request: Any, context: Context) -> AsyncIterator[Any]:  # noqa: N802 - gRPC name
        async for response in self._jobs.watch(request):
            yield response

    async def GetJob(self, request: Any, context: Context) -> Any:  # noqa: N802 - gRPC method name
        return await self._jobs.get(request)

    async def CancelJob(self, request: Any, context: Context) -> Any:  # noqa: N802 - gRPC method name
        return await self._jobs.cancel(request)

    async def ListJobs(self, request: Any, context: Context) -> Any:  # noqa: N802 - gRPC method name
        return await self._jobs.list(request)


def deadline(context: Context) -> Callable[[], float | None]:
    """Seconds left of the call's deadline, still right after the call itself has ended.

    The job outlives its stream; its deadline does not move with it.
    """
    remaining: float | None = context.time_remaining()  # None without a deadline (the stubs omit it)
    if remaining is None:
        return lambda: None
    end = time.monotonic() + remaining
    return lambda: end - time.monotonic()

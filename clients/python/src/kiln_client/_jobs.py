"""Jobs by id, the same for both services: look one up, watch it, cancel it, list recent ones.

`JobsClient` (blocking) and `AsyncJobsClient` (asyncio) add these calls to the service clients,
typed by each service's ``Job`` and ``GenerateResponse`` messages. Calls about one job carry the
gateway's session header remembered for it (`kiln_client.SESSION_HEADER`), so they reach the
replica that runs it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from kiln.common.v1 import job_pb2
from kiln_client._base import AsyncServiceClient, ServiceClient, StubT
from kiln_client._stream import enum_value

JobT = TypeVar("JobT", bound=Message)
EventT = TypeVar("EventT", bound=Message)

TERMINAL_STATES = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})
"""States a job ends in; it never leaves them."""


def job_state(value: str | int) -> int:
    """``"running"``, ``"JOB_STATE_RUNNING"`` or a number → the ``JobState`` number."""
    return enum_value(job_pb2.JobState, "JOB_STATE_", value)


def state_name(state: int) -> str:
    """``JOB_STATE_RUNNING`` → ``running``."""
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


@dataclass(frozen=True)
class JobPage(Generic[JobT]):
    """One page of ``ListJobs``.

    Attributes:
        jobs: The jobs, newest first.
        next_page_token: Pass as ``page_token`` for the next page; empty on the last.
    """

    jobs: list[JobT]
    next_page_token: str


class JobsClient(ServiceClient[StubT], Generic[StubT, JobT, EventT]):
    """A blocking service client with the job calls; see `Img2ImgClient` and `MeshClient`."""

    def get_job(self, job_id: str, *, timeout: float | None = None) -> JobT:
        """The job's state, queue position, last progress, request (without the image) and result.

        Args:
            job_id: ``accepted.job_id`` of its stream.
            timeout: Deadline in seconds; default the client's.

        Raises:
            NotFoundError: No such job (never, or past the servers' retention).
            InvalidArgumentError: ``job_id`` is malformed.
        """
        request = self._messages.GetJobRequest(job_id=job_id)
        job: JobT = self._job_unary(self._calls.GetJob, request, job_id, timeout).job
        return job

    def watch_job(self, job_id: str, *, after: int = 0, timeout: float | None = None) -> Generator[EventT]:
        """The job's events after sequence ``after``: those retained, then live ones to the end.

        The events are those ``generate`` yields, each with its ``sequence``; a finished job
        replays and ends. A stream that breaks is resumed from the last event, as ``generate``'s
        is. Leaving the iteration stops watching; the job goes on (watching never cancels).

        Args:
            job_id: ``accepted.job_id`` of its stream.
            after: The last sequence already seen; 0 replays from ``accepted``.
            timeout: Deadline in seconds for the whole stream; default the client's.

        Raises:
            KilnError: The job failed (its ``error`` event), or the call did.
        """
        return self._watch(job_id, after, timeout)

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> JobT:
        """Cancel a queued or running job; a finished one is returned unchanged (idempotent).

        Returns:
            The job: ``JOB_STATE_CANCELLED``, or the terminal state it had already reached.
        """
        request = self._messages.CancelJobRequest(job_id=job_id)
        job: JobT = self._job_unary(self._calls.CancelJob, request, job_id, timeout).job
        return job

    def list_jobs_page(
        self,
        *,
        states: Iterable[str | int] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> JobPage[JobT]:
        """One page of recent jobs, newest first.

        Args:
            states: Only jobs in these states (``"running"``, ``"JOB_STATE_QUEUED"``, numbers).
            page_size: Jobs per page, at most 100; 0 is the server's 20.
            page_token: ``next_page_token`` of the previous page, with the same ``states``.
            timeout: Deadline in seconds; default the client's.
        """
        request = _list_request(self._messages, states, page_size, page_token)
        return _page(self._unary(self._calls.ListJobs, request, timeout))

    def list_jobs(
        self, *, states: Iterable[str | int] = (), page_size: int = 0, timeout: float | None = None
    ) -> Iterator[JobT]:
        """Recent jobs, newest first, fetching page after page as the iteration goes on.

        Arguments as `list_jobs_page`; ``timeout`` applies to each page.
        """
        states, token = list(states), ""
        while True:
            page = self.list_jobs_page(states=states, page_size=page_size, page_token=token, timeout=timeout)
            yield from page.jobs
            if not (token := page.next_page_token):
                return


class AsyncJobsClient(AsyncServiceClient[StubT], Generic[StubT, JobT, EventT]):
    """The asyncio form of `JobsClient`: the same calls, awaited; streams are async iterators."""

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> JobT:
        """See `JobsClient.get_job`."""
        request = self._messages.GetJobRequest(job_id=job_id)
        job: JobT = (await self._job_unary(self._calls.GetJob, request, job_id, timeout)).job
        return job

    def watch_job(self, job_id: str, *, after: int = 0, timeout: float | None = None) -> AsyncGenerator[EventT]:
        """See `JobsClient.watch_job`."""
        return self._watch(job_id, after, timeout)

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> JobT:
        """See `JobsClient.cancel_job`."""
        request = self._messages.CancelJobRequest(job_id=job_id)
        job: JobT = (await self._job_unary(self._calls.CancelJob, request, job_id, timeout)).job
        return job

    async def list_jobs_page(
        self,
        *,
        states: Iterable[str | int] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> JobPage[JobT]:
        """See `JobsClient.list_jobs_page`."""
        request = _list_request(self._messages, states, page_size, page_token)
        return _page(await self._unary(self._calls.ListJobs, request, timeout))

    async def list_jobs(
        self, *, states: Iterable[str | int] = (), page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[JobT]:
        """See `JobsClient.list_jobs`."""
        states, token = list(states), ""
        while True:
            page = await self.list_jobs_page(states=states, page_size=page_size, page_token=token, timeout=timeout)
            for job in page.jobs:
                yield job
            if not (token := page.next_page_token):
                return


def _list_request(messages: ModuleType, states: Iterable[str | int], page_size: int, page_token: str) -> Any:
    return messages.ListJobsRequest(
        states=[job_state(state) for state in states], page_size=page_size, page_token=page_token
    )


def _page(response: Any) -> JobPage[Any]:
    return JobPage(jobs=list(response.jobs), next_page_token=response.next_page_token)

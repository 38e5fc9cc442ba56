"""Jobs that outlive their streams: the event log, watchers, cancellation and retention.

A job runs in a background task (its pump) that drains `JobRunner.run` and appends every
event to the job's log under a sequence number (1 for `accepted`). `Generate` and `WatchJob`
streams are watchers: they read the log from a cursor, then wait for more. A dropped stream
therefore loses no work: the job goes on, and a new watcher replays what it missed. What
happens when the last watcher leaves is the job's `DisconnectPolicy`; an abandoned job is
cancelled after the grace period, so it never holds a slot for long.

Everything here runs on the event loop; the only threads are the record writes, which a
per-job lock keeps in order (a heartbeat can never overwrite the final record).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln_runtime.errors import Cancelled, FieldViolation, InternalError, InvalidArgument, KilnError
from kiln_runtime.jobs import (
    AcceptedEvent,
    ChunkEvent,
    ErrorEvent,
    JobEvent,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
    RunnerEvent,
    StartedEvent,
)
from kiln_runtime.principal import ANONYMOUS
from kiln_runtime.settings import JobsSettings
from kiln_runtime.telemetry.logging import request_id_var
from kiln_runtime.telemetry.metrics import ServiceMetrics

log = logging.getLogger(__name__)

#: Seconds between retention sweeps (expiry, compaction, the count and byte bounds).
SWEEP_INTERVAL_S = 5.0
#: How long CancelJob waits for the job's terminal event; the pump records it at once, so this
#: only matters if the event loop is starved.
CANCEL_WAIT_S = 10.0
#: Rough per-event bookkeeping cost, so that a job of many small events still counts.
EVENT_OVERHEAD_BYTES = 200


class JobState(enum.Enum):
    """Mirrors `kiln.common.v1.JobState`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class DisconnectPolicy(enum.Enum):
    """Mirrors `kiln.common.v1.DisconnectPolicy`: what the last watcher leaving means."""

    WAIT_FOR_WATCHER = "wait_for_watcher"
    CANCEL = "cancel"
    DETACH = "detach"


@dataclass(frozen=True)
class Submission:
    """What is known of a job before it is accepted."""

    request: Any  # the request message without its image: GetJob's `request`
    client_request_id: str
    fingerprint: str  # equal for equal requests (AIP-155), see job_api.fingerprint
    policy: DisconnectPolicy
    owner: str = ANONYMOUS  # the principal that submitted it; only it sees the job and its artifacts


@dataclass(eq=False)
class Job:
    """One accepted job: its state for GetJob, and its event log for watchers."""

    id: str
    submission: Submission
    created_at: float  # unix seconds
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    position: int = 0
    queue_eta_s: float | None = None
    progress: ProgressEvent | None = None  # the latest, its preview dropped
    result: ResultEvent[Any] | None = None
    error: KilnError | None = None
    # (sequence, event) in order; sequences have gaps only after `compacted`.
    events: list[tuple[int, JobEvent]] = field(default_factory=list)
    last_sequence: int = 0
    watchers: int = 0
    retained_bytes: int = 0
    compacted: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _grace: asyncio.TimerHandle | None = None
    _task: asyncio.Task[None] | None = None
    _cancel_reason: str = ""
    _finished: asyncio.Event = field(default_factory=asyncio.Event)
    _record_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def wait_finished(self) -> None:
        """Until the job has ended and the store has its final word (record written or removed)."""
        await self._finished.wait()

    def events_after(self, sequence: int) -> list[tuple[int, JobEvent]]:
        """The retained events with a larger sequence number."""
        start = bisect.bisect_right(self.events, sequence, key=lambda item: item[0])
        return self.events[start:]

    @property
    def closed(self) -> bool:
        """The terminal event is in the log: a watcher that has read it is done."""
        return self.state.terminal and bool(self.events) and self.events[-1][0] == self.last_sequence

    def _append(self, event: JobEvent, sequence: int | None = None) -> None:
        if sequence is None:
            self.last_sequence += 1
            sequence = self.last_sequence
        self.events.append((sequence, event))
        self.retained_bytes += event_bytes(event)
        # Wake every waiting watcher, then give the next ones a fresh event to wait on.
        self._changed.set()
        self._changed = asyncio.Event()


class JobRecorder(Protocol):
    """Writes job records beside the job's artifacts (job_api.StoreRecorder)."""

    def encode(self, job: Job) -> bytes:
        """The record of `job` as it is now (on the event loop: a consistent snapshot)."""
        ...

    def write(self, job_id: str, data: bytes) -> None:
        """Store the record (in a worker thread)."""
        ...

    def discard(self, job_id: str) -> None:
        """Remove everything stored for a cancelled job (in a worker thread)."""
        ...

    def cancel_requested(self, job_id: str) -> str | None:
        """The reason of a cancellation another replica left for this job, if any (in a thread)."""
        ...

    def retain(self, result: ResultEvent[Any]) -> ResultEvent[Any]:
        """The result as the table keeps it: its message built once, without the payload.

        The payload holds the output image and the input bytes; a retained job must not.
        """
        ...


@dataclass
class _Pending:
    """A submission between its arrival and its `accepted` event, for idempotent duplicates."""

    fingerprint: str
    accepted: asyncio.Future[Job]


class JobTable:
    """The jobs of one server: submit, watch, cancel, look up; retention in memory."""

    def __init__(
        self,
        settings: JobsSettings,
        *,
        recorder: JobRecorder | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self._recorder = recorder
        self._metrics = metrics
        self._jobs: dict[str, Job] = {}  # insertion order is creation order
        # Keyed by (owner, client_request_id): ids are the client's own, so two principals may pick the same.
        self._by_request_id: dict[tuple[str, str], Job | _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the retention sweep and the record heartbeat (on the server's loop)."""
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="kiln-jobs-sweep")
        if self._recorder is not None:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="kiln-jobs-heartbeat")

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish for up to `grace_s`, then cancel the rest (shutdown)."""
        live = [job for job in self._jobs.values() if not job.state.terminal]
        if live:
            waits = [asyncio.ensure_future(job._finished.wait()) for job in live]
            _, pending = await asyncio.wait(waits, timeout=grace_s)
            for wait in pending:
                wait.cancel()
        for job in list(self._jobs.values()):
            if not job.state.terminal:
                await self.cancel(job.id, reason="the server shut down before the job finished")
        if self._tasks:  # record writes still in flight
            await asyncio.wait(set(self._tasks), timeout=CANCEL_WAIT_S)
        for task in (self._sweeper, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # --- lookups ---------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job if this server has it in memory (running, or finished and not yet expired)."""
        job = self._jobs.get(job_id)
        expires = None if job is None else self.expire_time(job)
        if job is not None and expires is not None and time.time() >= expires and job.watchers == 0:
            self._forget(job)  # the sweep would soon; the answer must not depend on its timing
            return None
        return job

    def newest_first(self) -> Iterator[Job]:
        return reversed(list(self._jobs.values()))

    def expire_time(self, job: Job) -> float | None:
        """When a finished job is forgotten; None while it runs."""
        return None if job.finished_at is None else job.finished_at + self.settings.retention_s

    # --- submit ----------------------------------------------------------------------------

    async def submit(self, events: AsyncIterator[RunnerEvent], submission: Submission) -> Job:
        """Start the job whose events `events` yields, or attach to its earlier twin.

        Returns once the job is accepted. A refusal before acceptance (invalid input, capacity,
        storage) is raised here, as a plain status. The same `client_request_id` from the same
        principal with the same request returns the existing job (the model runs once); with a
        different request it is INVALID_ARGUMENT naming `client_request_id`. Another principal's
        ids never match: each principal's ids are its own.
        """
        key = submission.client_request_id
        scoped = (submission.owner, key)
        while key and (earlier := self._by_request_id.get(scoped)) is not None:
            fingerprint = earlier.fingerprint if isinstance(earlier, _Pending) else earlier.submission.fingerprint
            if fingerprint != submission.fingerprint:
                await _close(events)
                owner = earlier.id if isinstance(earlier, Job) else "still being submitted"
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "client_request_id",
                            f"{key!r} was already used for a different request (job {owner}); "
                            "use a new id for a new request",
                        )
                    ]
                )
            if isinstance(earlier, Job):
                await _close(events)
                return earlier
            try:
                job = await asyncio.shield(earlier.accepted)
            except asyncio.CancelledError:
                if not earlier.accepted.cancelled():
                    raise  # this caller left
                continue  # the first submitter left before acceptance: submit anew
            await _close(events)
            return job
        pending = _Pending(submission.fingerprint, asyncio.get_running_loop().create_future())
        if key:
            self._by_request_id[scoped] = pending
        task = asyncio.create_task(self._pump(events, submission, pending), name="kiln-job")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(pending.accepted)
        except asyncio.CancelledError:
            if pending.accepted.done() and not pending.accepted.cancelled():
                self._left(pending.accepted.result())  # accepted just as the caller left
            elif not pending.accepted.done():
                task.cancel()  # left during admission: nothing was accepted
            raise

    async def _pump(self, events: AsyncIterator[RunnerEvent], submission: Submission, pending: _Pending) -> None:
        key = (submission.owner, submission.client_request_id)
        try:
            first = await anext(events)
        except asyncio.CancelledError:
            pending.accepted.cancel()
            self._forget_pending(key, pending)
            await _close(events)
            return
        except Exception as err:  # a refusal: raised to the submitter
            pending.accepted.set_exception(err)
            self._forget_pending(key, pending)
            return
        if not isinstance(first, AcceptedEvent):  # the runner's contract; never leave the submitter waiting
            log.error("a job's first event was %r, not AcceptedEvent", first)
            pending.accepted.set_exception(InternalError(request_id_var.get() or "unknown"))
            self._forget_pending(key, pending)
            await _close(events)
            return
        job = Job(first.job_id, submission, created_at=time.time(), position=first.position)
        job._task = asyncio.current_task()
        self._jobs[job.id] = job
        if key[1]:
            self._by_request_id[key] = job
        job._append(first)
        self._update_gauges()
        # The terminal event is recorded once the runner has finished cleaning up (slot, model
        # hold), so a client that sees it can count on the server being at rest.
        terminal: JobEvent | None = None
        try:
            # Stored before anybody hears of the job: from then on any replica sharing the store
            # can answer for it, even if this one dies at once.
            await self._save(job)
            pending.accepted.set_result(job)
            async for event in events:
                if isinstance(event, ResultEvent | ErrorEvent):
                    terminal = event
                else:
                    await self._record(job, event)
        except KilnError as err:  # raised after its ErrorEvent
            terminal = terminal or ErrorEvent(err)
        except asyncio.CancelledError:
            await _close(events)
            if not pending.accepted.done():  # the submitter left while the first record was written
                pending.accepted.cancel()
            terminal = terminal or ErrorEvent(Cancelled(job._cancel_reason or "the job was cancelled"))
        except Exception:
            log.exception("job %s failed unexpectedly", job.id)
            terminal = ErrorEvent(InternalError(request_id_var.get() or job.id))
        # Without a terminal event the runner broke its contract; the job must still end.
        await self._record(job, terminal or ErrorEvent(InternalError(job.id)))

    async def _record(self, job: Job, event: RunnerEvent) -> None:
        if isinstance(event, StartedEvent):
            job.state, job.started_at, job.position, job.queue_eta_s = JobState.RUNNING, time.time(), 0, None
            self._update_gauges()
            self._save_soon(job)
            return
        if job.state.terminal:
            return
        if isinstance(event, QueuedEvent):
            job.position, job.queue_eta_s = event.position, event.eta_s
        elif isinstance(event, ProgressEvent):
            job.progress = _without_preview(event)
        elif isinstance(event, ResultEvent):
            if self._recorder is not None:
                event = self._recorder.retain(event)
            job.result = event
            job.state = JobState.SUCCEEDED
        elif isinstance(event, ErrorEvent):
            job.error = event.error
            job.state = JobState.CANCELLED if isinstance(event.error, Cancelled) else JobState.FAILED
        if not job.state.terminal:
            job._append(event)
            return
        # The final record is stored before any watcher sees the terminal event, so a client
        # that asks another replica right after its result finds the job finished there too.
        job.last_sequence += 1
        sequence = job.last_sequence
        try:
            await self._finish(job)
        finally:
            job._append(event, sequence)
            job._finished.set()  # CancelJob and shutdown wait for this

    async def _finish(self, job: Job) -> None:
        job.finished_at = time.time()
        job.position, job.queue_eta_s = 0, None
        self._cancel_grace(job)
        if self._metrics is not None:
            self._metrics.jobs_finished.labels(service=self._metrics.service, state=job.state.value).inc()
        self._update_gauges()
        if job.state is JobState.CANCELLED:
            await self._discard(job)
        else:
            await self._save(job)
        self._enforce_bounds()

    # --- watch -----------------------------------------------------------------------------

    async def watch(self, job: Job, after: int = 0) -> AsyncIterator[tuple[int, JobEvent]]:
        """The job's events after sequence `after`: retained ones, then live until the terminal one."""
        job.watchers += 1
        self._cancel_grace(job)
        try:
            cursor = after
            while True:
                changed = job._changed
                for sequence, event in job.events_after(cursor):
                    yield sequence, event
                    cursor = sequence
                if job.closed and cursor >= job.last_sequence:
                    return
                await changed.wait()
        finally:
            job.watchers -= 1
            if job.watchers == 0:
                self._left(job)

    def _left(self, job: Job) -> None:
        """The last watcher left: apply the job's DisconnectPolicy."""
        if job.state.terminal or job.watchers > 0:
            return
        policy = job.submission.policy
        if policy is DisconnectPolicy.DETACH:
            return
        if policy is DisconnectPolicy.CANCEL:
            self._cancel_soon(job, "its stream was closed (DisconnectPolicy CANCEL)")
            return
        grace = self.settings.disconnect_grace_s
        reason = (
            f"nobody watched the job for {grace:g} s after its stream was dropped, so it was cancelled and its "
            "slot freed (DisconnectPolicy WAIT_FOR_WATCHER; reattach sooner with WatchJob, or submit with DETACH)"
        )
        self._cancel_grace(job)
        job._grace = asyncio.get_running_loop().call_later(grace, self._abandon, job, reason)

    def _cancel_grace(self, job: Job) -> None:
        if job._grace is not None:
            job._grace.cancel()
            job._grace = None

    # --- cancel ----------------------------------------------------------------------------

    async def cancel(self, job_id: str, *, reason: str = "cancelled by CancelJob") -> Job | None:
        """Cancel a queued or running job and wait for its terminal event; None if unknown here."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if not job.state.terminal:
            self._cancel_soon(job, reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job._finished.wait()), CANCEL_WAIT_S)
        return job

    def _abandon(self, job: Job, reason: str) -> None:
        if not job.state.terminal and self._metrics is not None:
            self._metrics.jobs_abandoned.inc()
        self._cancel_soon(job, reason)

    def _cancel_soon(self, job: Job, reason: str) -> None:
        if job.state.terminal or job._task is None:
            return
        job._cancel_reason = job._cancel_reason or reason
        log.info("cancelling job %s: %s", job.id, reason)
        job._task.cancel()

    # --- records ---------------------------------------------------------------------------

    def _save_soon(self, job: Job) -> None:
        """Store the record without holding the job up (the lock keeps the writes in order)."""
        if self._recorder is not None:
            task = asyncio.create_task(self._save(job), name="kiln-job-record")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _save(self, job: Job) -> None:
        if self._recorder is None:
            return
        async with job._record_lock:
            if job.state is JobState.CANCELLED:
                return  # a cancelled job keeps nothing in the store, a late heartbeat included
            try:  # encoded under the lock: the record written last is the newest
                await _in_thread(self._recorder.write, job.id, self._recorder.encode(job))
            except Exception as err:  # the job itself is fine; only other replicas see less
                log.warning("could not store the record of job %s: %s", job.id, err)

    async def _discard(self, job: Job) -> None:
        if self._recorder is None:
            return
        async with job._record_lock:
            try:
                await _in_thread(self._recorder.discard, job.id)
            except Exception as err:
                log.warning("could not remove the stored files of cancelled job %s: %s", job.id, err)

    async def _heartbeat_loop(self) -> None:
        """Rewrite the records of unfinished jobs, and act on cancellations left by other replicas."""
        assert self._recorder is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for job in [job for job in self._jobs.values() if not job.state.terminal]:
                try:
                    reason = await asyncio.to_thread(self._recorder.cancel_requested, job.id)
                except Exception as err:
                    log.warning("could not check job %s for a cancellation: %s", job.id, err)
                    reason = None
                if reason:
                    self._cancel_soon(job, reason)
                else:
                    await self._save(job)

    # --- retention -------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL_S, max(self.settings.disconnect_grace_s, 0.1)))
            self.sweep()

    def sweep(self, now: float | None = None) -> None:
        """Compact jobs finished a grace period ago, forget expired ones, enforce the bounds."""
        now = time.time() if now is None else now
        grace, retention = self.settings.disconnect_grace_s, self.settings.retention_s
        for job in list(self._jobs.values()):
            if job.finished_at is None or job.watchers > 0:
                continue
            if now - job.finished_at >= retention:
                self._forget(job)
            elif not job.compacted and now - job.finished_at >= grace:
                compact(job)
        self._enforce_bounds()
        self._update_gauges()

    def _enforce_bounds(self) -> None:
        finished = [job for job in self._jobs.values() if job.finished_at is not None]
        total = sum(job.retained_bytes for job in finished)
        excess = len(finished) - self.settings.max_retained_jobs
        for job in finished:  # oldest first
            if excess <= 0 and total <= self.settings.max_retained_bytes:
                break
            if job.watchers > 0:
                continue
            self._forget(job)
            excess -= 1
            total -= job.retained_bytes

    @property
    def retained_bytes(self) -> int:
        return sum(job.retained_bytes for job in self._jobs.values())

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        key = (job.submission.owner, job.submission.client_request_id)
        if key[1] and self._by_request_id.get(key) is job:
            del self._by_request_id[key]
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        counts = dict.fromkeys(JobState, 0)
        for job in self._jobs.values():
            counts[job.state] += 1
        for state, count in counts.items():
            self._metrics.jobs.labels(service=self._metrics.service, state=state.value).set(count)
        self._metrics.jobs_retained_bytes.set(self.retained_bytes)

    def _forget_pending(self, key: tuple[str, str], pending: _Pending) -> None:
        if key[1] and self._by_request_id.get(key) is pending:
            del self._by_request_id[key]


def compact(job: Job) -> None:
    """Shrink a finished job's log for long retention (ARCHITECTURE.md, "Jobs").

    Previews go except the latest, artifact chunks go (their sequence numbers stay unused), and
    the result keeps its artifacts by reference only: clients download them by id or URI.
    """
    latest_preview = max(
        (seq for seq, event in job.events if isinstance(event, ProgressEvent) and event.update.preview is not None),
        default=None,
    )
    kept: list[tuple[int, JobEvent]] = []
    for sequence, event in job.events:
        if isinstance(event, ChunkEvent):
            continue
        if isinstance(event, ProgressEvent) and sequence != latest_preview:
            event = _without_preview(event)
        elif isinstance(event, ResultEvent):
            event = by_reference(event)
        kept.append((sequence, event))
    job.events = kept
    if job.result is not None:
        job.result = by_reference(job.result)
    job.retained_bytes = sum(event_bytes(event) for _, event in kept)
    job.compacted = True


def by_reference(result: ResultEvent[Any]) -> ResultEvent[Any]:
    """The result with its artifacts referenced by id and URI only (no inline bytes, no chunks)."""
    artifacts = [dataclasses.replace(a, inline_data=b"", chunk_count=0) for a in result.artifacts]
    return dataclasses.replace(result, artifacts=artifacts)


def event_bytes(event: JobEvent) -> int:
    """Approximate memory an event holds: its byte payloads plus a fixed overhead."""
    size = EVENT_OVERHEAD_BYTES
    if isinstance(event, ChunkEvent):
        size += len(event.data)
    elif isinstance(event, ProgressEvent) and event.update.preview is not None:
        size += len(event.update.preview.data)
    elif isinstance(event, ResultEvent):
        size += sum(len(a.inline_data) for a in event.artifacts)
    return size


def _without_preview(event: ProgressEvent) -> ProgressEvent:
    if event.update.preview is None:
        return event
    return dataclasses.replace(event, update=dataclasses.replace(event.update, preview=None))


async def _in_thread(function: Callable[..., None], *args: Any) -> None:
    """Run a store call in a thread; a cancelled caller still waits for the thread to end.

    Cancelling the wait does not stop the thread, and the job's record lock must cover the whole
    call: a record write still running could otherwise recreate the folder of a discarded job.
    """
    call = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait({call})
        raise


async def _close(events: AsyncIterator[RunnerEvent]) -> None:
    """Close an unstarted or abandoned event iterator so its cleanup (`finally`) runs now."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()

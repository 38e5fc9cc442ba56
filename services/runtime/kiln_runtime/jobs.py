"""Runs one job from admission to result and turns it into a stream of domain events.

The order of a stream is fixed: `AcceptedEvent`, `QueuedEvent`s while waiting,
`STAGE_LOAD_MODEL` progress while an idle-unloaded model loads (keep-alive), the
provider's `ProgressEvent`s, `ChunkEvent`s for chunked artifacts, then exactly one
`ResultEvent` or `ErrorEvent`. Model work runs in a worker thread so the event loop keeps
answering health checks, GetInfo and metrics. The slot belongs to the worker thread: it is
released when the work really stops, not when the client goes away, so a cancelled job can
never oversubscribe the device and a slot can never leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kiln_runtime.errors import Cancelled, DeadlineExceeded, InternalError, KilnError, StorageFull
from kiln_runtime.limits import AdmissionController, Slot, Ticket
from kiln_runtime.model_manager import ModelHold, ModelManager
from kiln_runtime.principal import current_principal
from kiln_runtime.provider import ProgressUpdate, RunContext, Stage
from kiln_runtime.storage import ArtifactStore, StoredArtifact, new_job_id
from kiln_runtime.storage.budget import StorageGuard
from kiln_runtime.telemetry.logging import job_id_var, request_id_var
from kiln_runtime.telemetry.metrics import ServiceMetrics

log = logging.getLogger(__name__)

PayloadT = TypeVar("PayloadT")

# Room left in every message for the fields around chunk or inline bytes.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
# Seconds between STAGE_LOAD_MODEL events while a model loads: a load reports no steps of
# its own, so the stream shows the ETA counting down instead of falling silent.
LOAD_REPORT_INTERVAL_S = 1.0


class Delivery(enum.Enum):
    """How artifact bytes travel back; mirrors `kiln.common.v1.ArtifactDelivery`."""

    DEFAULT = "default"  # inline if small, else reference only
    INLINE = "inline"  # inline if small, else chunks
    CHUNKED = "chunked"
    REFERENCE = "reference"


@dataclass(frozen=True)
class ProducedArtifact:
    """An artifact the work stored, with its bytes still in hand for delivery."""

    stored: StoredArtifact
    data: bytes


@dataclass(frozen=True)
class JobOutput(Generic[PayloadT]):
    """What a job's work function returns: a service-specific payload and its artifacts."""

    payload: PayloadT
    artifacts: Sequence[ProducedArtifact]


@dataclass(frozen=True)
class AcceptedEvent:
    job_id: str
    position: int


@dataclass(frozen=True)
class QueuedEvent:
    position: int
    eta_s: float | None


@dataclass(frozen=True)
class ProgressEvent:
    update: ProgressUpdate
    eta_s: float | None


@dataclass(frozen=True)
class ChunkEvent:
    artifact_id: str
    offset: int
    data: bytes
    last: bool


@dataclass(frozen=True)
class DeliveredArtifact:
    stored: StoredArtifact
    inline_data: bytes = b""
    chunk_count: int = 0


@dataclass(frozen=True)
class ResultEvent(Generic[PayloadT]):
    job_id: str
    payload: PayloadT
    artifacts: list[DeliveredArtifact]
    timings: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ErrorEvent:
    error: KilnError


@dataclass(frozen=True)
class StartedEvent:
    """The job got its slot (it is RUNNING now). For the job table only; never sent to clients."""


JobEvent = AcceptedEvent | QueuedEvent | ProgressEvent | ChunkEvent | ResultEvent[Any] | ErrorEvent
#: What `JobRunner.run` yields: the events clients see, and the table's own markers.
RunnerEvent = JobEvent | StartedEvent
Work = Callable[[RunContext], JobOutput[PayloadT]]

_DONE = object()


class JobRunner:
    """Admission, execution off the event loop, progress forwarding, cancellation, delivery."""

    def __init__(
        self,
        *,
        admission: AdmissionController,
        store: ArtifactStore,
        metrics: ServiceMetrics,
        max_message_bytes: int,
        max_inline_bytes: int,
        model: ModelManager | None = None,
        storage_guard: StorageGuard | None = None,
    ) -> None:
        self.admission = admission
        self.model = model
        # Local storage only: refuses jobs whose results the disk or the budget could not keep.
        self.storage_guard = storage_guard
        self.store = store
        self.metrics = metrics
        self.chunk_bytes = max(max_message_bytes - MESSAGE_OVERHEAD_BYTES, 16 * 1024)
        self.max_inline_bytes = min(max_inline_bytes, self.chunk_bytes)
        # One thread per slot: the admission controller already bounds concurrency.
        self._executor = ThreadPoolExecutor(max_workers=admission.max_concurrency, thread_name_prefix="kiln-run")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(
        self,
        work: Work[PayloadT],
        *,
        delivery: Delivery = Delivery.DEFAULT,
        timings: Sequence[tuple[str, float]] = (),
        time_remaining: Callable[[], float | None] = lambda: None,
        prepare: Callable[[], Awaitable[object]] | None = None,
    ) -> AsyncIterator[RunnerEvent]:
        """Admit and run `work`, yielding its events.

        Raises `StorageFull`, `Quota`, `Overloaded` or `ShuttingDown` before the first event when
        the job cannot be admitted. After the first event, a failure is yielded as `ErrorEvent` and
        then raised, so the call ends with the same status. Closing the iterator cancels the job.

        Args:
            work: The job itself, run in a worker thread once it holds a slot.
            delivery: How the artifacts travel back.
            timings: Phases measured before the call, reported in the result.
            time_remaining: The caller's deadline, in seconds left.
            prepare: Heavy input work (decoding the image) that runs only once the job is
                admitted, before its first event: a request refused for capacity never pays
                for it, and its failure (a corrupt image) is still a plain status. Timed as
                the `preprocess` phase.
        """
        self.check_storage()  # may raise StorageFull before anything is sent
        # The call's principal (set by the request interceptor; the job's pump task inherits it)
        # decides its quota and its turn in the fair queue.
        ticket = self.admission.admit(current_principal())  # may raise before anything is sent
        phases = list(timings)
        if prepare is not None:
            prepare_started = time.perf_counter()
            try:
                await prepare()
            except BaseException:
                ticket.abandon()  # the place or slot goes to the next job
                raise
            phases.append(("preprocess", time.perf_counter() - prepare_started))
        job_id = new_job_id()
        job_id_var.set(job_id)
        self._update_gauges()
        worker_owns_slot = False
        # Held from admission, so that a queued job keeps the model from an idle unload too.
        hold = self.model.hold() if self.model is not None else None
        try:
            yield AcceptedEvent(job_id=job_id, position=ticket.position)
            queued_at = time.perf_counter()
            slot: Slot | None = None
            async for event_or_slot in self._wait_for_slot(ticket):
                if isinstance(event_or_slot, QueuedEvent):
                    yield event_or_slot
                else:
                    slot = event_or_slot
            assert slot is not None
            phases.append(("queue", time.perf_counter() - queued_at))
            yield StartedEvent()
            remaining = time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the deadline passed while the job waited for a slot")
            if self.model is not None and (load := self.model.load_task()) is not None:
                # Loaded inside the slot: a load uses the device like a run, and jobs that got
                # slots at the same time share this one load.
                load_started = time.perf_counter()
                async for load_event in self._wait_for_load(load, self.model.last_load_s):
                    yield load_event
                phases.append(("load_model", time.perf_counter() - load_started))
                remaining = time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the deadline passed while the model was loading")
            worker_owns_slot = True
            async for event in self._execute(job_id, slot, work, delivery, phases, hold):
                yield event
        except KilnError as err:
            yield ErrorEvent(err)
            raise
        finally:
            if not worker_owns_slot:  # left while queued or before the run: free the place or slot
                ticket.abandon()
                if hold is not None:
                    hold.release()
            self._update_gauges()

    def storage_refusal(self) -> StorageFull | None:
        """The `StorageFull` one more job would get now (see storage/budget.py), or None."""
        if self.storage_guard is None:
            return None
        # Every job admitted and not finished will store its results too.
        return self.storage_guard.shortfall(pending_jobs=self.admission.running + self.admission.queued)

    def check_storage(self) -> None:
        """Raise `StorageFull` when one more job's results could not be stored."""
        if (refusal := self.storage_refusal()) is not None:
            self.metrics.count_storage_full(when="admission")
            raise refusal

    async def _wait_for_load(self, load: asyncio.Task[None], expected_s: float | None) -> AsyncIterator[ProgressEvent]:
        """STAGE_LOAD_MODEL events until the shared load finishes; raises its `ModelNotReady`.

        The ETA is the last load's duration minus the time spent so far, plus the mean run
        time when one is known; there is none before the first load. A client leaving stops
        only its own wait (`asyncio.wait` never cancels the load other jobs share).
        """
        started = time.perf_counter()
        mean_run_s = self.admission.snapshot().mean_run_s or 0.0

        def event() -> ProgressEvent:
            elapsed = time.perf_counter() - started
            eta = None if expected_s is None else max(expected_s - elapsed, 0.0) + mean_run_s
            # Not counted in steps (a load reports none); the job's own work has not begun.
            return ProgressEvent(ProgressUpdate(Stage.LOAD_MODEL, 0, 0, 0.0), eta)

        yield event()
        while not load.done():
            await asyncio.wait({load}, timeout=LOAD_REPORT_INTERVAL_S)
            if not load.done():
                yield event()
        load.result()

    async def _wait_for_slot(self, ticket: Ticket) -> AsyncIterator[QueuedEvent | Slot]:
        if ticket.position > 0:
            yield QueuedEvent(ticket.position, self.admission.eta_for_position(ticket.position))
        moves: asyncio.Queue[int] = asyncio.Queue()
        waiter = asyncio.ensure_future(ticket.wait_for_slot(on_position=moves.put_nowait))
        try:
            while not waiter.done():
                next_move = asyncio.ensure_future(moves.get())
                await asyncio.wait({waiter, next_move}, return_when=asyncio.FIRST_COMPLETED)
                if next_move.done():
                    position = next_move.result()
                    self._update_gauges()
                    yield QueuedEvent(position, self.admission.eta_for_position(position))
                else:
                    next_move.cancel()
        finally:
            if not waiter.done():
                waiter.cancel()  # the client left while queued: give the place up
        yield waiter.result()

    async def _execute(
        self,
        job_id: str,
        slot: Slot,
        work: Work[PayloadT],
        delivery: Delivery,
        phases: list[tuple[str, float]],
        hold: ModelHold | None,
    ) -> AsyncIterator[JobEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()

        def post(item: object) -> None:
            # The loop may have closed under a shutdown; then nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, item)

        ctx = RunContext(job_id, report=post)
        started = time.perf_counter()

        def worker() -> JobOutput[PayloadT]:
            succeeded = False
            self.metrics.inflight_runs.inc()
            try:
                output = work(ctx)
                succeeded = True
                if ctx.cancelled:  # finished just as the client left: store nothing
                    self.store.delete_job(job_id)
                return output
            finally:
                self.metrics.inflight_runs.dec()
                slot.release(run_seconds=time.perf_counter() - started if succeeded else None)
                if hold is not None:  # after the slot: a waiting job takes its slot first
                    hold.release()
                post(_DONE)

        # In a copy of this task's context, so the run's log lines keep the request and job ids.
        future = loop.run_in_executor(self._executor, contextvars.copy_context().run, worker)
        try:
            while (item := await events.get()) is not _DONE:
                assert isinstance(item, ProgressUpdate)
                yield ProgressEvent(item, _eta(started, item.fraction))
            output = await future
        except (asyncio.CancelledError, GeneratorExit):
            ctx.cancel()
            future.add_done_callback(_log_abandoned_failure)
            raise
        except KilnError as err:
            if isinstance(err, Cancelled):  # removing a folder is file I/O: not on the loop
                await asyncio.to_thread(self.store.delete_job, job_id)
            raise
        except Exception as err:
            request_id = request_id_var.get() or job_id
            log.exception("job %s failed unexpectedly", job_id)
            raise InternalError(request_id) from err
        phases.extend(ctx.timer.phases)
        phases.append(("run", time.perf_counter() - started))
        for phase, seconds in ctx.timer.phases:
            self.metrics.observe_phase(phase, seconds)
        delivered: list[DeliveredArtifact] = []
        for artifact in output.artifacts:
            chunks = self._chunks(artifact, delivery)
            for chunk in chunks:
                yield chunk
            delivered.append(self._delivered(artifact, delivery, len(chunks)))
        yield ResultEvent(job_id=job_id, payload=output.payload, artifacts=delivered, timings=phases)

    def _inline(self, artifact: ProducedArtifact, delivery: Delivery) -> bool:
        fits = len(artifact.data) <= self.max_inline_bytes
        return fits and delivery in (Delivery.DEFAULT, Delivery.INLINE)

    def _chunks(self, artifact: ProducedArtifact, delivery: Delivery) -> list[ChunkEvent]:
        wants_chunks = delivery is Delivery.CHUNKED or (
            delivery is Delivery.INLINE and not self._inline(artifact, delivery)
        )
        if not wants_chunks:
            return []
        data, size, step = artifact.data, len(artifact.data), self.chunk_bytes
        offsets = range(0, max(size, 1), step)
        return [
            ChunkEvent(artifact.stored.id, offset, data[offset : offset + step], offset + step >= size)
            for offset in offsets
        ]

    def _delivered(self, artifact: ProducedArtifact, delivery: Delivery, chunk_count: int) -> DeliveredArtifact:
        inline = artifact.data if self._inline(artifact, delivery) else b""
        return DeliveredArtifact(artifact.stored, inline_data=inline, chunk_count=chunk_count)

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.admission.queued)


def _log_abandoned_failure(future: asyncio.Future[Any]) -> None:
    """Collect the outcome of a run whose client left; only unexpected failures are worth a log."""
    if future.cancelled():
        return
    error = future.exception()
    if error is not None and not isinstance(error, Cancelled):
        log.error("a job whose client had left failed", exc_info=error)


def _eta(started: float, fraction: float) -> float | None:
    if fraction <= 0:
        return None
    elapsed = time.perf_counter() - started
    return max(elapsed / fraction - elapsed, 0.0)

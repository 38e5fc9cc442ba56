"""Per-model admission control: a few run slots and a bounded, fair wait queue in front of them.

A request calls `AdmissionController.admit(principal)` on the event loop and gets a `Ticket` (a
slot at once, or a place in the queue) or an error to send straight back: `Quota` when the
principal already has its limit of queued plus running jobs, `Overloaded` when the queue is
full, `ShuttingDown` while draining. `Ticket.wait_for_slot()` yields the `Slot`, which the worker
thread that ran the job hands back with `Slot.release()` from whatever thread it is on.

Everything but `Slot.release()` runs on the loop thread, so the bookkeeping needs no locks; a
release from another thread is marshalled onto the loop. A freed slot goes straight to a waiter,
never back to a pool, so a newcomer cannot overtake the queue.

Fairness: the queue is one FIFO per principal, served round-robin. The principal at the head of
the rotation gets up to its weight in grants (default 1), then moves to the back if it still
waits. A principal that had nobody waiting joins at the back of the rotation, so its first job is
granted after every principal already waiting has had at most one more turn: one client flooding
the queue delays another's job by at most one of its own jobs per turn (its weight's worth), not
by its whole backlog. Positions are each ticket's place in the order the rotation will grant if
nobody else arrives; they are recomputed on every change, so a position can also grow when
another principal's job joins ahead of it in that order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kiln_runtime.errors import Overloaded, Quota, ShuttingDown
from kiln_runtime.principal import ANONYMOUS

_log = logging.getLogger(__name__)

_EWMA_ALPHA = 0.3
_MIN_RETRY_AFTER_S = 0.1
_DEFAULT_RUN_ESTIMATE_S = 1.0


@dataclass(frozen=True)
class AdmissionSnapshot:
    """Counters for metrics; `mean_run_s` is the run-time estimate in use, None if there is none yet."""

    running: int
    queued: int
    max_concurrency: int
    max_queue: int
    mean_run_s: float | None


class _State(enum.Enum):
    QUEUED = "queued"
    HOLDING = "holding"
    DONE = "done"


class Slot:
    """The right to run one job; give it back with `release()` when the run ends.

    Attributes:
        acquired_at: The controller's clock reading when this slot was handed out.
    """

    def __init__(self, controller: AdmissionController, ticket: Ticket, loop: asyncio.AbstractEventLoop) -> None:
        self._controller = controller
        self._ticket = ticket
        self._loop = loop
        self.acquired_at = controller._clock()
        # Worker threads may race each other (or the loop) to release; the flag makes one win.
        self._release_lock = threading.Lock()
        self._released = False

    def release(self, *, run_seconds: float | None = None) -> None:
        """Free the slot for the next waiter; safe from any thread, and a no-op after the first call.

        Args:
            run_seconds: How long the job ran; feeds the run-time estimate behind retry hints
                and queue ETAs. Leave it out when the slot was not used for a run.
        """
        with self._release_lock:
            if self._released:
                return
            self._released = True
        if _running_loop() is self._loop:
            self._controller._free(self, run_seconds)
            return
        try:
            self._loop.call_soon_threadsafe(self._controller._free, self, run_seconds)
        except RuntimeError:
            # The loop is closed, so nothing is left on it that could wait for this slot.
            _log.debug("slot released after its event loop closed")


class Ticket:
    """One admitted request: it holds a slot or a place in the wait queue.

    Attributes:
        principal: Who asked; the queue is fair between principals.
        position: The current 1-based place in the order the queue will grant slots; 0 once it
            holds a slot (or has left).
    """

    def __init__(
        self, controller: AdmissionController, loop: asyncio.AbstractEventLoop, principal: str, position: int
    ) -> None:
        self.principal = principal
        self.position = position
        self._controller = controller
        self._loop = loop
        self._state = _State.QUEUED
        self._slot: Slot | None = None
        self._future: asyncio.Future[None] | None = None
        self._on_position: Callable[[int], None] | None = None
        self._reported_position = position

    async def wait_for_slot(self, on_position: Callable[[int], None] | None = None) -> Slot:
        """Wait, in the queue's fair order, until this ticket holds a slot, and return it.

        If the awaiting task is cancelled, the ticket leaves the queue (or passes on a slot it
        was handed at that moment) and the `CancelledError` propagates.

        Args:
            on_position: Called with the new position each time it changes while waiting (not
                with the starting position, nor with 0 when the slot arrives: returning says that).

        Raises:
            RuntimeError: The ticket was abandoned or released, or is already being waited on.
        """
        if self._state is _State.QUEUED:
            if self._future is not None:
                raise RuntimeError("wait_for_slot() is already being awaited for this ticket")
            future: asyncio.Future[None] = self._loop.create_future()
            self._future = future
            self._on_position = on_position
            self._reported_position = self.position
            self._controller._slot_futures.add(future)
            try:
                await future
            except asyncio.CancelledError:
                # The client went away. A slot handed over in the same instant must move on.
                self.abandon()
                raise
            finally:
                self._controller._slot_futures.discard(future)
                self._future = None
                self._on_position = None
        if self._state is not _State.HOLDING or self._slot is None:
            raise RuntimeError("ticket was abandoned or its slot already released")
        return self._slot

    def abandon(self) -> None:
        """Give up the queue place or the slot without running; calling it again does nothing.

        A task still awaiting `wait_for_slot()` on this ticket gets a `RuntimeError`.
        """
        if self._state is _State.QUEUED:
            self._controller._leave_queue(self)
            if self._future is not None and not self._future.done():
                self._future.set_exception(RuntimeError("ticket was abandoned while waiting for a slot"))
        elif self._state is _State.HOLDING and self._slot is not None:
            self._slot.release()

    def _notify_position(self) -> None:
        callback = self._on_position
        if callback is None or self._state is not _State.QUEUED or self.position == self._reported_position:
            return
        self._reported_position = self.position
        try:
            callback(self.position)
        except Exception:
            # A broken progress callback must not stop the queue from moving for everyone else.
            _log.exception("on_position callback failed")


class AdmissionController:
    """Admission for one model: `max_concurrency` run slots and a fair queue of `max_queue` places.

    Args:
        max_concurrency: Jobs that may run at once (at least 1).
        max_queue: Jobs that may wait for a slot, all principals together (0 rejects whenever
            every slot is busy).
        clock: Monotonic clock in seconds; stamps `Slot.acquired_at`.
        initial_run_estimate_s: Run time assumed until the first run is timed; without it
            retry hints assume 1 s and `eta_for_position()` returns None.
        principal_weights: Grants per turn of the rotation by principal (at least 1); others get 1.
        max_jobs_per_principal: Most queued plus running jobs one principal may have; 0 is no limit.
    """

    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        initial_run_estimate_s: float | None = None,
        principal_weights: Mapping[str, int] | None = None,
        max_jobs_per_principal: int = 0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {max_queue}")
        if initial_run_estimate_s is not None and not initial_run_estimate_s > 0:
            raise ValueError(f"initial_run_estimate_s must be positive, got {initial_run_estimate_s}")
        weights = dict(principal_weights or {})
        for name, weight in weights.items():
            if weight < 1:
                raise ValueError(f"the weight of principal {name!r} must be at least 1, got {weight}")
        if max_jobs_per_principal < 0:
            raise ValueError(f"max_jobs_per_principal must be at least 0, got {max_jobs_per_principal}")
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self._weights = weights
        self._max_jobs_per_principal = max_jobs_per_principal
        self._clock = clock
        self._initial_run_estimate_s = initial_run_estimate_s
        self._mean_run_s: float | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # `running` and `queued` are the sizes of these, so no counter can drift from the truth.
        self._holders: set[Slot] = set()
        # One FIFO per principal that has a waiter (never an empty one), and those principals in
        # the order they are served: the head gets the next grant.
        self._queues: dict[str, deque[Ticket]] = {}
        self._rotation: deque[str] = deque()
        # Grants the head of the rotation has had in its current turn; below its weight.
        self._head_grants = 0
        self._slot_futures: set[asyncio.Future[None]] = set()
        self._idle_futures: list[asyncio.Future[None]] = []

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def running(self) -> int:
        """Slots held, including one handed to a waiter that has not resumed yet."""
        return len(self._holders)

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    @property
    def max_jobs_per_principal(self) -> int:
        return self._max_jobs_per_principal

    def weight(self, principal: str) -> int:
        """Grants `principal` gets per turn of the rotation."""
        return self._weights.get(principal, 1)

    def jobs_of(self, principal: str) -> tuple[int, int]:
        """(running, queued) jobs of `principal`, counted from the slots and its queue."""
        running = sum(1 for slot in self._holders if slot._ticket.principal == principal)
        return running, len(self._queues.get(principal, ()))

    @property
    def draining(self) -> bool:
        return self._draining

    def admit(self, principal: str = ANONYMOUS) -> Ticket:
        """Take a slot if one is free and nobody waits, else a place at the back of `principal`'s queue.

        Raises:
            ShuttingDown: `start_draining()` was called.
            Quota: `principal` already has `max_jobs_per_principal` jobs queued or running.
            Overloaded: Every slot is busy and the queue is full.
        """
        if self._draining:
            raise ShuttingDown("server is shutting down; retry on another replica")
        loop = self._bind_loop()
        # Before capacity: the caller can act on its own limit, and a QUOTA refusal must not
        # turn into a CAPACITY one that Envoy would retry on another replica.
        self._check_quota(principal)
        if len(self._holders) < self._max_concurrency and not self._queues:
            ticket = Ticket(self, loop, principal, position=0)
            self._grant(ticket)
            return ticket
        if self.queued < self._max_queue:
            ticket = Ticket(self, loop, principal, position=0)  # `_enqueue` places it
            self._enqueue(ticket)
            return ticket
        estimate = self.retry_after_estimate()
        busy = f"all {self._max_concurrency} slot(s) busy and {self._max_queue} job(s) waiting"
        raise Overloaded(
            f"{busy}; retry in {estimate:.1f} s",
            retry_after_s=estimate,
            metadata={
                "running": str(self.running),
                "queued": str(self.queued),
                "max_concurrency": str(self._max_concurrency),
                "max_queue": str(self._max_queue),
            },
        )

    def retry_after_estimate(self) -> float:
        """Seconds until a newcomer could expect a place: (queued + 1) runs spread over the slots."""
        mean = self._effective_mean_run_s() or _DEFAULT_RUN_ESTIMATE_S
        return max(_MIN_RETRY_AFTER_S, (self.queued + 1) * mean / self._max_concurrency)

    def own_job_end_estimate(self, principal: str) -> float:
        """Seconds until one of `principal`'s jobs should end, freeing a place under its quota.

        The running job closest to its expected end, else the first queued one's ETA plus a run.
        """
        mean = self._effective_mean_run_s() or _DEFAULT_RUN_ESTIMATE_S
        now = self._clock()
        ends = [mean - (now - slot.acquired_at) for slot in self._holders if slot._ticket.principal == principal]
        queue = self._queues.get(principal)
        if queue:
            ends.append(queue[0].position * mean / self._max_concurrency + mean)
        if not ends:
            return _MIN_RETRY_AFTER_S
        return max(_MIN_RETRY_AFTER_S, min(ends))

    def eta_for_position(self, position: int) -> float | None:
        """Seconds until the ticket at `position` should get a slot; None with no run-time estimate."""
        mean = self._effective_mean_run_s()
        if mean is None:
            return None
        return position * mean / self._max_concurrency

    def snapshot(self) -> AdmissionSnapshot:
        """The current counters, for metrics."""
        return AdmissionSnapshot(
            running=self.running,
            queued=self.queued,
            max_concurrency=self._max_concurrency,
            max_queue=self._max_queue,
            mean_run_s=self._effective_mean_run_s(),
        )

    def start_draining(self) -> None:
        """Refuse new work from now on; tickets already admitted keep their place and still run."""
        self._draining = True

    async def wait_idle(self) -> None:
        """Return once no slot is held and nobody waits."""
        if self._is_idle():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_futures.append(future)
        try:
            await future
        finally:
            if future in self._idle_futures:
                self._idle_futures.remove(future)

    def check_at_rest(self) -> None:
        """Check that nothing is held, queued or awaited once all work has finished.

        Raises:
            AssertionError: Listing every broken invariant.
        """
        problems = self._invariant_problems()
        if self._holders:
            problems.append(f"{len(self._holders)} slot(s) still held")
        if self._queues:
            problems.append(f"{self.queued} ticket(s) still queued")
        if self._slot_futures:
            problems.append(f"{len(self._slot_futures)} wait_for_slot() future(s) still pending")
        if self._idle_futures:
            problems.append(f"{len(self._idle_futures)} wait_idle() future(s) left over")
        if problems:
            raise AssertionError("admission controller not at rest: " + "; ".join(problems))

    def _invariant_problems(self) -> list[str]:
        problems = []
        if len(self._holders) > self._max_concurrency:
            problems.append(f"{len(self._holders)} slots held, limit {self._max_concurrency}")
        if self.queued > self._max_queue:
            problems.append(f"{self.queued} tickets queued, limit {self._max_queue}")
        if self._queues and len(self._holders) < self._max_concurrency:
            problems.append("a slot is free while tickets wait")
        if sorted(self._rotation) != sorted(self._queues) or len(set(self._rotation)) != len(self._rotation):
            problems.append(f"rotation {list(self._rotation)} does not match the queues {list(self._queues)}")
        for principal, queue in self._queues.items():
            if not queue:
                problems.append(f"empty queue kept for {principal!r}")
            if any(ticket.principal != principal for ticket in queue):
                problems.append(f"another principal's ticket in the queue of {principal!r}")
        if self._rotation and not 0 <= self._head_grants < self.weight(self._rotation[0]):
            problems.append(f"head of the rotation has had {self._head_grants} grants this turn")
        for index, ticket in enumerate(self._grant_order(), start=1):
            if ticket._state is not _State.QUEUED or ticket.position != index:
                problems.append(f"queue entry {index} is {ticket._state.value} at position {ticket.position}")
        for slot in self._holders:
            if slot._ticket._state is not _State.HOLDING or slot._ticket._slot is not slot:
                problems.append(f"held slot belongs to a {slot._ticket._state.value} ticket")
        return problems

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Off-loop releases are marshalled to the loop the slot came from; mixing loops while
            # slots are out would split the bookkeeping between threads.
            if self._holders or self._queues:
                raise RuntimeError("AdmissionController is in use on another event loop")
            self._loop = loop
        return loop

    def _effective_mean_run_s(self) -> float | None:
        return self._mean_run_s if self._mean_run_s is not None else self._initial_run_estimate_s

    def _record_run(self, run_seconds: float) -> None:
        # One bogus timing would skew the estimate for many runs to come.
        if not math.isfinite(run_seconds) or run_seconds < 0:
            _log.warning("ignoring run time %r s", run_seconds)
            return
        if self._mean_run_s is None:
            self._mean_run_s = run_seconds
        else:
            self._mean_run_s = _EWMA_ALPHA * run_seconds + (1 - _EWMA_ALPHA) * self._mean_run_s

    def _grant(self, ticket: Ticket) -> None:
        assert self._loop is not None  # set by admit(), which created the ticket
        slot = Slot(self, ticket, self._loop)
        self._holders.add(slot)
        ticket._state = _State.HOLDING
        ticket._slot = slot
        ticket.position = 0
        if ticket._future is not None and not ticket._future.done():
            ticket._future.set_result(None)

    def _free(self, slot: Slot, run_seconds: float | None) -> None:
        """Runs on the loop: drop the slot and hand it to the first waiter."""
        self._holders.remove(slot)
        slot._ticket._state = _State.DONE
        if run_seconds is not None:
            self._record_run(run_seconds)
        if self._queues:
            self._grant(self._pop_next())
            self._reposition()
        self._wake_if_idle()

    def _check_quota(self, principal: str) -> None:
        limit = self._max_jobs_per_principal
        if limit == 0:
            return
        running, queued = self.jobs_of(principal)
        if running + queued < limit:
            return
        estimate = self.own_job_end_estimate(principal)
        raise Quota(
            f"you already have {running + queued} jobs queued or running here (the limit is {limit}); "
            f"wait for one to finish or cancel one (about {estimate:.1f} s until one of them ends)",
            retry_after_s=estimate,
            metadata={"principal": principal, "running": str(running), "queued": str(queued), "limit": str(limit)},
        )

    def _enqueue(self, ticket: Ticket) -> None:
        queue = self._queues.get(ticket.principal)
        if queue is None:
            # A principal with nobody waiting joins at the back: it is served once each principal
            # already waiting has finished one turn (the head finishes the turn it is in), so it
            # neither waits for their backlogs nor jumps ahead of anyone's current turn.
            queue = self._queues[ticket.principal] = deque()
            self._rotation.append(ticket.principal)
        queue.append(ticket)
        self._reposition()

    def _pop_next(self) -> Ticket:
        """Take the waiter the rotation serves next; `_grant_order()` predicts exactly this."""
        principal = self._rotation[0]
        queue = self._queues[principal]
        ticket = queue.popleft()
        self._head_grants += 1
        if not queue:
            del self._queues[principal]
            self._rotation.popleft()
            self._head_grants = 0
        elif self._head_grants >= self.weight(principal):
            self._rotation.rotate(-1)
            self._head_grants = 0
        return ticket

    def _grant_order(self) -> list[Ticket]:
        """Every waiter in the order `_pop_next()` will grant them if nobody else arrives."""
        remaining = {principal: list(queue) for principal, queue in self._queues.items()}
        taken = dict.fromkeys(remaining, 0)
        rotation = deque(self._rotation)
        used = self._head_grants  # only the head can be part-way through its turn
        order: list[Ticket] = []
        while rotation:
            principal = rotation.popleft()
            queue, start = remaining[principal], taken[principal]
            count = min(self.weight(principal) - used, len(queue) - start)
            order.extend(queue[start : start + count])
            taken[principal] = start + count
            used = 0
            if taken[principal] < len(queue):
                rotation.append(principal)
        return order

    def _leave_queue(self, ticket: Ticket) -> None:
        queue = self._queues[ticket.principal]
        queue.remove(ticket)
        if not queue:
            del self._queues[ticket.principal]
            if self._rotation[0] == ticket.principal:
                self._head_grants = 0  # the next principal starts a fresh turn
            self._rotation.remove(ticket.principal)
        ticket._state = _State.DONE
        ticket.position = 0
        self._reposition()
        self._wake_if_idle()

    def _reposition(self) -> None:
        """Give every waiter its place in the grant order, then tell those whose place changed.

        The queue is small (`max_queue`), so recomputing it all on each change is cheap and
        keeps every position true, including a rise when another principal's job enters ahead.
        """
        order = self._grant_order()
        for index, ticket in enumerate(order, start=1):
            ticket.position = index
        # Callbacks run only after every position is right, so one that re-enters sees a
        # consistent queue.
        for ticket in order:
            ticket._notify_position()

    def _is_idle(self) -> bool:
        return not self._holders and not self._queues

    def _wake_if_idle(self) -> None:
        if not self._is_idle():
            return
        idle_futures, self._idle_futures = self._idle_futures, []
        for future in idle_futures:
            if not future.done():
                future.set_result(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

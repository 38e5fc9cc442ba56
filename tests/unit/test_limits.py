"""Unit tests for kiln_runtime.limits: slots, the FIFO queue, cancellation, draining, estimates."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from google.rpc import code_pb2, error_details_pb2

from kiln_runtime.errors import Overloaded, ShuttingDown
from kiln_runtime.limits import AdmissionController, AdmissionSnapshot, Slot, Ticket


async def settle(rounds: int = 5) -> None:
    """Let woken tasks run; no wall-clock waiting."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def admit_holding(ctl: AdmissionController) -> Slot:
    ticket = ctl.admit()
    assert ticket.position == 0
    return await ticket.wait_for_slot()  # returns at once: it already holds a slot


class Waiter:
    """A task waiting on a ticket, recording the positions it is told and the slot it gets."""

    def __init__(self, ctl: AdmissionController, woken: list[Waiter] | None = None) -> None:
        self.ticket = ctl.admit()
        self.positions: list[int] = []
        self.slot: Slot | None = None
        self._woken = woken
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        self.slot = await self.ticket.wait_for_slot(on_position=self.positions.append)
        if self._woken is not None:
            self._woken.append(self)


async def test_admits_limit_plus_queue_and_rejects_the_rest_with_retry_info() -> None:
    ctl = AdmissionController(2, 3)

    async def try_admit() -> Ticket:
        await asyncio.sleep(0)
        return ctl.admit()

    results = await asyncio.gather(*(try_admit() for _ in range(10)), return_exceptions=True)
    tickets = [r for r in results if isinstance(r, Ticket)]
    rejected = [r for r in results if isinstance(r, Overloaded)]
    assert len(tickets) == 5
    assert len(rejected) == 5
    assert sorted(t.position for t in tickets) == [0, 0, 1, 2, 3]
    assert (ctl.running, ctl.queued) == (2, 3)

    error = rejected[0]
    assert error.retry_after_s == pytest.approx(2.0)  # (3 queued + 1) * 1.0 s default / 2 slots
    assert error.message == "all 2 slot(s) busy and 3 job(s) waiting; retry in 2.0 s"
    status = error.to_status("test")
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    info = error_details_pb2.ErrorInfo()
    assert [d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR)] == [True]
    assert [d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR)] == [True]
    assert retry.retry_delay.ToNanoseconds() > 0
    assert info.reason == "CAPACITY"
    assert info.domain == "test"
    assert dict(info.metadata) == {"running": "2", "queued": "3", "max_concurrency": "2", "max_queue": "3"}

    for ticket in tickets:
        ticket.abandon()
    ctl.check_at_rest()


async def test_released_slots_go_to_waiters_in_fifo_order() -> None:
    ctl = AdmissionController(1, 4)
    first = await admit_holding(ctl)
    woken: list[Waiter] = []
    waiters = [Waiter(ctl, woken) for _ in range(3)]
    await settle()
    assert [w.ticket.position for w in waiters] == [1, 2, 3]

    first.release()
    # The slot was handed to the first waiter, so a newcomer queues behind the rest.
    late = Waiter(ctl, woken)
    assert late.ticket.position == 3
    await settle()
    assert woken == waiters[:1]

    slot = first
    for expected in range(2, 5):
        assert woken[-1].slot is not None
        assert woken[-1].slot is not slot
        slot = woken[-1].slot
        assert ctl.running == 1
        slot.release(run_seconds=0.1)
        await settle()
        assert len(woken) == expected
    assert woken == [*waiters, late]
    assert [w.positions for w in waiters] == [[], [1], [2, 1]]
    assert late.positions == [2, 1]

    assert woken[-1].slot is not None
    woken[-1].slot.release()
    await ctl.wait_idle()
    ctl.check_at_rest()


async def test_cancelled_waiter_frees_its_place_and_those_behind_move_up() -> None:
    ctl = AdmissionController(1, 3)
    slot = await admit_holding(ctl)
    waiters = [Waiter(ctl) for _ in range(3)]
    await settle()
    with pytest.raises(Overloaded):
        ctl.admit()

    waiters[1].task.cancel()
    await settle()
    assert waiters[1].task.cancelled()
    assert ctl.queued == 2
    assert [w.ticket.position for w in waiters] == [1, 0, 2]
    assert waiters[2].positions == [2]
    assert waiters[0].positions == []

    newcomer = ctl.admit()
    assert newcomer.position == 3
    newcomer.abandon()
    slot.release()
    await settle()
    for waiter in (waiters[0], waiters[2]):
        assert waiter.slot is not None
        waiter.slot.release()
        await settle()
    await ctl.wait_idle()
    ctl.check_at_rest()


async def test_slot_handed_to_a_waiter_cancelled_in_the_same_instant_moves_on() -> None:
    ctl = AdmissionController(1, 2)
    slot = await admit_holding(ctl)
    doomed, next_in_line = Waiter(ctl), Waiter(ctl)
    await settle()

    slot.release()  # hands the slot to `doomed`, whose task has not resumed yet
    doomed.task.cancel()
    await settle()
    assert doomed.task.cancelled()
    assert next_in_line.slot is not None
    assert ctl.running == 1
    next_in_line.slot.release()
    await ctl.wait_idle()
    ctl.check_at_rest()


async def test_release_from_another_thread_hands_the_slot_to_the_next_waiter() -> None:
    ctl = AdmissionController(1, 2)
    slot = await admit_holding(ctl)
    waiter = Waiter(ctl)
    behind = ctl.admit()
    callback_threads: list[int] = []
    behind_task = asyncio.create_task(behind.wait_for_slot(lambda _: callback_threads.append(threading.get_ident())))
    await settle()

    worker = threading.Thread(target=slot.release, kwargs={"run_seconds": 0.5})
    worker.start()
    worker.join()
    await asyncio.wait_for(waiter.task, timeout=5)
    assert waiter.slot is not None
    assert ctl.running == 1
    assert ctl.snapshot().mean_run_s == pytest.approx(0.5)
    # The hand-over was marshalled onto the loop, so callbacks never run on the worker thread.
    assert callback_threads == [threading.get_ident()]
    assert behind.position == 1

    slot.release()  # a second release of the same slot must not free someone else's
    assert ctl.running == 1
    waiter.slot.release()
    (await behind_task).release()
    await ctl.wait_idle()
    ctl.check_at_rest()


async def test_estimates_follow_an_ewma_of_recorded_run_times() -> None:
    ctl = AdmissionController(2, 4)
    assert ctl.eta_for_position(1) is None
    assert ctl.snapshot().mean_run_s is None
    assert ctl.retry_after_estimate() == pytest.approx(0.5)  # 1 * 1.0 s default / 2 slots

    first, second = await admit_holding(ctl), await admit_holding(ctl)
    third, fourth = ctl.admit(), ctl.admit()
    first.release(run_seconds=2.0)
    assert ctl.snapshot().mean_run_s == pytest.approx(2.0)  # the first timing seeds the mean
    second.release(run_seconds=4.0)
    mean = 0.3 * 4.0 + 0.7 * 2.0
    snapshot = ctl.snapshot()
    assert snapshot == AdmissionSnapshot(
        running=2, queued=0, max_concurrency=2, max_queue=4, mean_run_s=snapshot.mean_run_s
    )
    assert snapshot.mean_run_s == pytest.approx(mean)
    assert ctl.retry_after_estimate() == pytest.approx(mean / 2)
    assert ctl.eta_for_position(3) == pytest.approx(3 * mean / 2)
    late = [ctl.admit(), ctl.admit()]
    assert ctl.retry_after_estimate() == pytest.approx(3 * mean / 2)

    for ticket in late:
        ticket.abandon()
    (await third.wait_for_slot()).release(run_seconds=float("nan"))  # ignored, not folded in
    (await fourth.wait_for_slot()).release()  # no timing: not folded in either
    assert ctl.snapshot().mean_run_s == pytest.approx(mean)
    for _ in range(40):
        (await admit_holding(ctl)).release(run_seconds=0.001)
    assert ctl.retry_after_estimate() == pytest.approx(0.1)  # the floor
    ctl.check_at_rest()


async def test_initial_run_estimate_is_used_until_a_run_is_timed() -> None:
    ctl = AdmissionController(2, 1, initial_run_estimate_s=3.0)
    assert ctl.eta_for_position(2) == pytest.approx(3.0)
    assert ctl.retry_after_estimate() == pytest.approx(1.5)
    assert ctl.snapshot().mean_run_s == pytest.approx(3.0)
    (await admit_holding(ctl)).release(run_seconds=1.0)
    assert ctl.eta_for_position(2) == pytest.approx(1.0)
    ctl.check_at_rest()


async def test_draining_refuses_new_work_but_runs_what_is_queued() -> None:
    ctl = AdmissionController(1, 2)
    slot = await admit_holding(ctl)
    woken: list[Waiter] = []
    waiters = [Waiter(ctl, woken), Waiter(ctl, woken)]
    await settle()

    ctl.start_draining()
    assert ctl.draining
    with pytest.raises(ShuttingDown) as refused:
        ctl.admit()
    assert refused.value.to_status("test").code == code_pb2.UNAVAILABLE
    assert refused.value.message == "server is shutting down; retry on another replica"

    idle = asyncio.create_task(ctl.wait_idle())
    slot.release()
    for count in (1, 2):
        await settle()
        assert woken == waiters[:count]
        assert not idle.done()
        assert woken[-1].slot is not None
        woken[-1].slot.release()
    await asyncio.wait_for(idle, timeout=5)
    ctl.check_at_rest()


async def test_check_at_rest_reports_held_and_queued_work() -> None:
    ctl = AdmissionController(1, 1)
    slot = await admit_holding(ctl)
    ticket = ctl.admit()
    with pytest.raises(AssertionError, match=r"1 slot\(s\) still held; 1 ticket\(s\) still queued"):
        ctl.check_at_rest()
    ticket.abandon()
    ticket.abandon()
    slot.release()
    ctl.check_at_rest()


def test_rejects_invalid_limits() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        AdmissionController(0, 1)
    with pytest.raises(ValueError, match="max_queue"):
        AdmissionController(1, -1)


async def test_randomized_admit_cancel_abandon_release_never_leaks_or_oversubscribes() -> None:
    rng = random.Random(20240611)
    seen = dict.fromkeys(("overloaded", "cancelled", "thread_release", "abandon_holding", "abandon_queued"), 0)
    for _ in range(1000):
        await _random_cycle(rng, seen)
    assert all(count > 0 for count in seen.values()), seen


async def _random_cycle(rng: random.Random, seen: dict[str, int]) -> None:
    ctl = AdmissionController(rng.randint(1, 3), rng.randint(0, 3))
    in_use = 0
    tasks: list[asyncio.Task[None]] = []
    threads: list[threading.Thread] = []
    admitted = 0
    granted_from_queue: list[int] = []

    def check_limits() -> None:
        assert in_use <= ctl.max_concurrency
        assert ctl.running <= ctl.max_concurrency
        assert ctl.queued <= ctl.max_queue

    def cancel_someone() -> None:
        victim = rng.choice(tasks)
        if not victim.done():
            victim.cancel()

    async def client() -> None:
        nonlocal in_use, admitted
        try:
            ticket = ctl.admit()
        except Overloaded:
            seen["overloaded"] += 1
            return
        check_limits()
        admitted += 1
        order = admitted
        slot = None
        positions: list[int] = []
        waiting = False
        try:
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # request work between admission and queueing
            if rng.random() < 0.1:
                seen["abandon_queued"] += ticket.position > 0
                ticket.abandon()  # failed before the run
                return
            waiting, start = True, ticket.position
            slot = await ticket.wait_for_slot(on_position=positions.append)
        except asyncio.CancelledError:
            seen["cancelled"] += 1
            # wait_for_slot gives the place up itself; a second abandon must be harmless.
            if not waiting or rng.random() < 0.5:
                ticket.abandon()
            raise
        # Every move forward is by one place, and the slot comes only from the head of the queue.
        assert positions == list(range(start - 1, 0, -1))
        if start > 0:  # it was awaiting, so it resumed in the order slots were handed out
            granted_from_queue.append(order)
        in_use += 1
        check_limits()
        try:
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
        finally:
            in_use -= 1
            how = rng.random()
            if how < 0.25:
                seen["thread_release"] += 1
                worker = threading.Thread(target=slot.release, kwargs={"run_seconds": rng.random()})
                threads.append(worker)
                worker.start()
            elif how < 0.35:
                seen["abandon_holding"] += 1
                ticket.abandon()
            else:
                slot.release(run_seconds=rng.random())
                if rng.random() < 0.3:
                    cancel_someone()  # lands in the instant between hand-over and resumption
                if rng.random() < 0.2:
                    slot.release()
            check_limits()

    tasks.extend(asyncio.create_task(client()) for _ in range(rng.randint(1, 8)))
    while not all(task.done() for task in tasks):
        check_limits()
        if rng.random() < 0.2:
            cancel_someone()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    for worker in threads:
        worker.join()
    await asyncio.wait_for(ctl.wait_idle(), timeout=5)
    assert ctl.running == ctl.queued == 0
    ctl.check_at_rest()
    assert granted_from_queue == sorted(granted_from_queue)  # FIFO

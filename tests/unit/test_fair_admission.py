"""Unit tests for the fair side of kiln_runtime.limits: per-principal queues served round-robin
(weighted), truthful positions, and the per-principal job quota. On an event loop, no server."""

from __future__ import annotations

import asyncio
import random

import pytest
from google.rpc import code_pb2, error_details_pb2
from pydantic import ValidationError

from kiln_img2img.config import Img2ImgSettings
from kiln_runtime.errors import Overloaded, Quota
from kiln_runtime.limits import AdmissionController, Slot


async def settle(rounds: int = 5) -> None:
    """Let woken tasks run; no wall-clock waiting."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Waiter:
    """A task waiting on a ticket; it appends itself to `granted` when its slot arrives."""

    def __init__(self, ctl: AdmissionController, principal: str, granted: list[Waiter], name: str = "") -> None:
        self.name = name or principal
        self.ticket = ctl.admit(principal)
        self.positions: list[int] = []
        self.slot: Slot | None = None
        self._granted = granted
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        self.slot = await self.ticket.wait_for_slot(on_position=self.positions.append)
        self._granted.append(self)

    def __repr__(self) -> str:
        return self.name


async def holding(ctl: AdmissionController, principal: str) -> Slot:
    ticket = ctl.admit(principal)
    assert ticket.position == 0
    return await ticket.wait_for_slot()


async def drain_in_order(ctl: AdmissionController, first: Slot, granted: list[Waiter]) -> list[str]:
    """Release slots one at a time, each to the next waiter, and return the order they were granted."""
    first.release()
    await settle()
    seen = 0
    while seen < len(granted):
        waiter = granted[seen]
        seen += 1
        assert waiter.slot is not None
        assert not ctl._invariant_problems()
        waiter.slot.release()
        await settle()
    ctl.check_at_rest()
    return [w.name for w in granted]


def by_position(waiters: list[Waiter]) -> list[str]:
    queued = [w for w in waiters if w.ticket.position > 0]
    positions = sorted(w.ticket.position for w in queued)
    assert positions == list(range(1, len(queued) + 1)), positions
    return [w.name for w in sorted(queued, key=lambda w: w.ticket.position)]


async def test_principals_are_served_round_robin_in_the_order_they_joined() -> None:
    ctl = AdmissionController(1, 10)
    first = await holding(ctl, "a")
    granted: list[Waiter] = []
    waiters = [Waiter(ctl, "a", granted, f"a{i}") for i in range(1, 4)]
    waiters += [Waiter(ctl, "b", granted, f"b{i}") for i in range(1, 3)]
    waiters += [Waiter(ctl, "c", granted, "c1")]
    await settle()
    predicted = by_position(waiters)
    assert predicted == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert await drain_in_order(ctl, first, granted) == predicted


async def test_a_weight_gives_that_many_grants_per_turn() -> None:
    ctl = AdmissionController(1, 10, principal_weights={"a": 2})
    first = await holding(ctl, "b")
    granted: list[Waiter] = []
    waiters = [Waiter(ctl, "a", granted, f"a{i}") for i in range(1, 6)]
    waiters += [Waiter(ctl, "b", granted, f"b{i}") for i in range(1, 4)]
    await settle()
    predicted = by_position(waiters)
    assert predicted == ["a1", "a2", "b1", "a3", "a4", "b2", "a5", "b3"]
    assert await drain_in_order(ctl, first, granted) == predicted


async def test_a_newcomer_waits_for_one_job_of_a_flooding_principal_not_its_backlog() -> None:
    ctl = AdmissionController(1, 25, initial_run_estimate_s=2.0)
    first = await holding(ctl, "a")
    granted: list[Waiter] = []
    flood = [Waiter(ctl, "a", granted, f"a{i}") for i in range(1, 20)]
    await settle()
    newcomer = Waiter(ctl, "b", granted, "b")
    await settle()
    assert newcomer.ticket.position == 2  # after the one job of A whose turn it is
    assert ctl.eta_for_position(newcomer.ticket.position) == pytest.approx(4.0)
    # Every A job from the second on moved back one place, and was told so.
    assert [w.ticket.position for w in flood[:3]] == [1, 3, 4]
    assert flood[1].positions == [3]
    assert flood[0].positions == []
    order = await drain_in_order(ctl, first, granted)
    assert order.index("b") == 1


async def test_a_new_principal_joins_behind_a_heavy_principal_part_way_through_its_turn() -> None:
    ctl = AdmissionController(1, 10, principal_weights={"a": 3})
    first = await holding(ctl, "c")
    granted: list[Waiter] = []
    waiters = [Waiter(ctl, "a", granted, f"a{i}") for i in range(1, 6)]
    await settle()
    first.release()  # a1 gets the slot: A is one grant into its turn of three
    await settle()
    assert [w.name for w in granted] == ["a1"]
    waiters.append(Waiter(ctl, "b", granted, "b1"))
    await settle()
    predicted = by_position(waiters)
    assert predicted == ["a2", "a3", "b1", "a4", "a5"]
    assert await drain_in_order(ctl, granted[0].slot, granted) == ["a1", *predicted]  # type: ignore[arg-type]


async def test_cancelling_a_waiter_takes_its_principal_out_of_the_rotation_and_moves_the_rest() -> None:
    ctl = AdmissionController(1, 10)
    first = await holding(ctl, "a")
    granted: list[Waiter] = []
    waiters = [
        Waiter(ctl, "a", granted, "a1"),
        Waiter(ctl, "b", granted, "b1"),
        Waiter(ctl, "a", granted, "a2"),
        Waiter(ctl, "c", granted, "c1"),
    ]
    await settle()
    assert by_position(waiters) == ["a1", "b1", "c1", "a2"]
    waiters[1].task.cancel()
    await settle()
    assert waiters[1].ticket.position == 0
    assert ctl.queued == 3
    assert by_position(waiters) == ["a1", "c1", "a2"]
    assert waiters[3].positions == [2]  # c1 moved up and was told
    assert waiters[2].positions == [3]  # a2 moved up from 4
    # B comes back: it joins at the back of the rotation, behind A's remaining turn order.
    waiters.append(Waiter(ctl, "b", granted, "b2"))
    await settle()
    assert by_position(waiters) == ["a1", "c1", "b2", "a2"]
    assert await drain_in_order(ctl, first, granted) == ["a1", "c1", "b2", "a2"]


async def test_a_principal_whose_queue_emptied_rejoins_at_the_back() -> None:
    ctl = AdmissionController(1, 10)
    first = await holding(ctl, "x")
    granted: list[Waiter] = []
    waiters = [Waiter(ctl, "a", granted, "a1"), Waiter(ctl, "b", granted, "b1"), Waiter(ctl, "b", granted, "b2")]
    await settle()
    first.release()
    await settle()
    assert [w.name for w in granted] == ["a1"]
    waiters.append(Waiter(ctl, "a", granted, "a2"))  # A has nobody waiting now: it rejoins behind B
    await settle()
    assert by_position(waiters) == ["b1", "a2", "b2"]
    assert await drain_in_order(ctl, granted[0].slot, granted) == ["a1", "b1", "a2", "b2"]  # type: ignore[arg-type]


async def test_a_newcomer_never_takes_a_free_slot_while_others_wait() -> None:
    ctl = AdmissionController(2, 10)
    slots = [await holding(ctl, "a"), await holding(ctl, "a")]
    granted: list[Waiter] = []
    waiter = Waiter(ctl, "a", granted, "a3")
    await settle()
    slots[0].release()  # handed to a3 before a3's task resumes
    late = ctl.admit("b")
    assert late.position == 1
    assert waiter.ticket.position == 0
    assert ctl.running == 2
    late.abandon()
    await settle()
    assert waiter.slot is not None
    waiter.slot.release()
    slots[1].release()
    await settle()
    ctl.check_at_rest()


async def test_max_queue_bounds_all_principals_together() -> None:
    ctl = AdmissionController(1, 3)
    first = await holding(ctl, "a")
    tickets = [ctl.admit("a"), ctl.admit("b"), ctl.admit("c")]
    assert ctl.queued == 3
    with pytest.raises(Overloaded):
        ctl.admit("d")
    with pytest.raises(Overloaded):
        ctl.admit("a")
    for ticket in tickets:
        ticket.abandon()
    first.release()
    await settle()
    ctl.check_at_rest()


async def test_quota_counts_queued_and_running_jobs_of_the_principal_only() -> None:
    now = [100.0]
    ctl = AdmissionController(1, 10, clock=lambda: now[0], initial_run_estimate_s=10.0, max_jobs_per_principal=2)
    running = await holding(ctl, "a")
    queued = ctl.admit("a")
    now[0] = 104.0
    with pytest.raises(Quota) as refused:
        ctl.admit("a")
    error = refused.value
    assert error.message.startswith(
        "you already have 2 jobs queued or running here (the limit is 2); wait for one to finish or cancel one"
    )
    assert error.retry_after_s == pytest.approx(6.0)  # its running job is 4 s into a 10 s run
    assert error.metadata == {"principal": "a", "running": "1", "queued": "1", "limit": "2"}
    assert not error.retriable
    status = error.to_status("test")
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert [d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR)] == [True]
    assert [d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR)] == [True]
    assert info.reason == "QUOTA"
    assert retry.retry_delay.ToNanoseconds() == 6_000_000_000

    other = ctl.admit("b")  # another principal still gets in
    assert other.position == 2

    queued.abandon()  # a queued job leaving frees a place under the quota too
    again = ctl.admit("a")
    assert again.position == 2  # behind b, which joined the rotation first
    with pytest.raises(Quota):
        ctl.admit("a")
    running.release(run_seconds=10.0)  # b's turn: a's running job ended
    await settle()
    assert ctl.jobs_of("a") == (0, 1)
    third = ctl.admit("a")
    for ticket in (other, again, third):
        ticket.abandon()
    await settle()
    ctl.check_at_rest()


async def test_quota_hint_for_a_principal_with_only_queued_jobs_is_its_first_eta_plus_a_run() -> None:
    ctl = AdmissionController(1, 10, initial_run_estimate_s=2.0, max_jobs_per_principal=1)
    first = await holding(ctl, "x")
    a = ctl.admit("a")
    b = ctl.admit("b")
    assert b.position == 2
    with pytest.raises(Quota) as refused:
        ctl.admit("b")
    assert refused.value.retry_after_s == pytest.approx(2 * 2.0 + 2.0)
    assert refused.value.metadata["queued"] == "1"
    for ticket in (a, b):
        ticket.abandon()
    first.release()
    ctl.check_at_rest()


def test_rejects_invalid_fairness_settings() -> None:
    with pytest.raises(ValueError, match="weight of principal 'a'"):
        AdmissionController(1, 1, principal_weights={"a": 0})
    with pytest.raises(ValueError, match="max_jobs_per_principal"):
        AdmissionController(1, 1, max_jobs_per_principal=-1)


async def test_randomized_positions_predict_the_grant_order_exactly() -> None:
    rng = random.Random(15)
    for _ in range(200):
        await _random_round(rng)


async def _random_round(rng: random.Random) -> None:
    principals = ["a", "b", "c", "d"][: rng.randint(1, 4)]
    weights = {p: rng.randint(1, 3) for p in principals if rng.random() < 0.5}
    ctl = AdmissionController(rng.randint(1, 3), rng.randint(0, 12), principal_weights=weights)
    granted: list[Waiter] = []
    waiters: list[Waiter] = []
    slots: list[Slot] = []
    for step in range(rng.randint(1, 40)):
        roll = rng.random()
        if roll < 0.6:
            principal = rng.choice(principals)
            try:
                if ctl.running < ctl.max_concurrency and not ctl.queued:
                    slots.append(await holding(ctl, principal))
                else:
                    waiters.append(Waiter(ctl, principal, granted, f"{principal}{step}"))
            except Overloaded:
                pass
        elif roll < 0.8 and waiters:
            rng.choice(waiters).task.cancel()
        else:
            # Release a slot; it goes to the waiter that held position 1, and nobody else moves
            # except one place up.
            holders = slots + [w.slot for w in granted if w.slot is not None]
            if holders:
                before = {w.name: w.ticket.position for w in waiters if w.ticket.position > 0}
                slot = rng.choice(holders)
                slot.release()
                if slot in slots:
                    slots.remove(slot)
                for w in granted:
                    if w.slot is slot:
                        w.slot = None
                await settle()
                if before:
                    head = next(name for name, position in before.items() if position == 1)
                    assert granted[-1].name == head
                    after = {w.name: w.ticket.position for w in waiters if w.ticket.position > 0}
                    assert after == {name: position - 1 for name, position in before.items() if position > 1}
        await settle()
        assert not ctl._invariant_problems()
        for w in waiters:
            if w.ticket.position > 0 and w.positions:
                assert w.positions[-1] == w.ticket.position  # the last position told is the true one
    # With no more arrivals, slots go exactly in the order the positions said.
    predicted = by_position(waiters)
    already = len(granted)
    for slot in slots:
        slot.release()
    for w in list(granted):
        if w.slot is not None:
            w.slot.release()
    await settle()
    while len(granted) > already and any(w.slot is not None for w in granted[already:]):
        for w in granted[already:]:
            if w.slot is not None:
                w.slot.release()
                w.slot = None
        await settle()
    assert [w.name for w in granted[already:]] == predicted
    await settle()
    ctl.check_at_rest()


def test_weights_and_quota_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_IMG2IMG__RUNTIME__PRINCIPAL_WEIGHTS", '{"studio": 3}')
    monkeypatch.setenv("KILN_IMG2IMG__JOBS__MAX_JOBS_PER_PRINCIPAL", "4")
    section = Img2ImgSettings(_env_file=None).img2img  # type: ignore[call-arg]
    assert section.runtime.principal_weights == {"studio": 3}
    assert section.jobs.max_jobs_per_principal == 4
    monkeypatch.setenv("KILN_IMG2IMG__RUNTIME__PRINCIPAL_WEIGHTS", '{"studio": 0}')
    with pytest.raises(ValidationError, match="principal_weights"):
        Img2ImgSettings(_env_file=None)  # type: ignore[call-arg]

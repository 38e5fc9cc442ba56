"""Dynamic batching: jobs that can share one pipeline call run as one batch.

The batcher sits between admission and the provider. Every job still holds its own slot and
its own worker thread (kiln_runtime.jobs): the thread calls `submit`, which either opens a
group for the job's batch key or joins the open one. The thread that opened a group is its
leader: it waits until the group is full (`max_batch_size`) or `max_batch_delay_s` has
passed, closes the group and runs the whole batch on its own thread; the other members wait
for their own outcome. A batch of N therefore needs N admitted jobs at once, i.e. batching
only helps with `max_concurrency >= max_batch_size`.

Members' slots are released when their worker threads return, which is when the batch has
finished (never earlier: a cancelled member's sample is still being computed by the device
until the batch ends or stops). Each member's run time is the batch's wall time, so the
admission controller's mean run time, queue positions and ETAs describe batched runs as they
are: `max_concurrency` jobs finish per mean run time when batches fill the slots.

The batch function returns one outcome per member, a result or an exception, so one member's
cancellation or failure reaches that member only; an exception raised by the batch function
itself (the pipeline failed) reaches every member of that batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kiln_img2img.providers.base import Img2ImgInput
from kiln_runtime.provider import RunContext

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")

#: Runs one batch: inputs and their jobs' contexts in, one result or exception per input out.
BatchFunction = Callable[[Sequence[InputT], Sequence[RunContext]], Sequence[OutputT | BaseException]]


@dataclass
class _Member(Generic[InputT, OutputT]):
    item: InputT
    ctx: RunContext
    done: threading.Event = field(default_factory=threading.Event)
    outcome: OutputT | BaseException | None = None


@dataclass
class _Group(Generic[InputT, OutputT]):
    members: list[_Member[InputT, OutputT]] = field(default_factory=list)
    full: threading.Event = field(default_factory=threading.Event)
    closed: bool = False


class Batcher(Generic[InputT, OutputT]):
    """Groups concurrent `submit` calls with equal keys into batches (thread-safe)."""

    def __init__(
        self,
        *,
        key: Callable[[InputT], Hashable],
        max_batch_size: int,
        max_batch_delay_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
        alone: Callable[[], bool] = lambda: False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.key = key
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.on_batch = on_batch  # told each batch's size before it runs (the histogram)
        # True when no other job is admitted: nobody could join, so the delay would be pure loss.
        self.alone = alone
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Group[InputT, OutputT]] = {}

    def submit(self, item: InputT, ctx: RunContext, run_batch: BatchFunction[InputT, OutputT]) -> OutputT:
        """Run `item` in a batch and return its own result; blocks the calling worker thread.

        `run_batch` is part of the group key (bound methods compare by their object): jobs that
        leased different providers (a reload in between) never share a batch.
        """
        member: _Member[InputT, OutputT] = _Member(item, ctx)
        key = (self.key(item), run_batch)
        with self._lock:
            group = self._open.get(key)
            leader = group is None
            if group is None:
                group = _Group()
                self._open[key] = group
            group.members.append(member)
            if len(group.members) >= self.max_batch_size:
                self._close(key, group)
        if leader:
            self._lead(key, group, run_batch)
        else:
            member.done.wait()
        outcome = member.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def _close(self, key: Hashable, group: _Group[InputT, OutputT]) -> None:
        """Stop the group taking members (under the lock)."""
        if not group.closed:
            group.closed = True
            if self._open.get(key) is group:
                del self._open[key]
            group.full.set()

    def _lead(self, key: Hashable, group: _Group[InputT, OutputT], run_batch: BatchFunction[InputT, OutputT]) -> None:
        # No wait when a batch of one is the most there can be, or no other job could join.
        if self.max_batch_size > 1 and not self.alone():
            group.full.wait(timeout=self.max_batch_delay_s)
        with self._lock:
            self._close(key, group)
            members = list(group.members)
        self.on_batch(len(members))
        try:
            outcomes: Sequence[OutputT | BaseException] = run_batch([m.item for m in members], [m.ctx for m in members])
            if len(outcomes) != len(members):
                raise RuntimeError(f"the batch function returned {len(outcomes)} outcomes for {len(members)} inputs")
        except BaseException as err:  # the whole batch failed: every member gets the error
            outcomes = [err] * len(members)
        for member, outcome in zip(members, outcomes, strict=True):
            member.outcome = outcome
            member.done.set()


def img2img_batch_key(request: Img2ImgInput) -> Hashable:
    """What img2img requests must share to run as one pipeline call.

    Size (one latent tensor), scheduler (one scheduler object steps the batch), step count and
    strength (together they fix the timesteps and the start step), and guidance scale (one
    value scales the whole batch's CFG; 1.0 or below turns CFG off, which changes the UNet
    batch). Prompts, negative prompts, seeds and preview intervals may differ.
    """
    return (
        request.image.size,
        request.scheduler,
        request.num_inference_steps,
        request.strength,
        request.guidance_scale,
    )

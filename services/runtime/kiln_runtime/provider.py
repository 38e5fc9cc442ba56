"""The provider interface every model backend implements, and what a run may report.

A provider is a local model or a vendor HTTP API behind one lifecycle: `load`, `warmup`,
`run`, `close`. `run` is blocking and always called in a worker thread, one call per slot;
it reports progress and checks for cancellation through the `RunContext` it is given.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from kiln_runtime.errors import Cancelled

RequestT = TypeVar("RequestT", contravariant=True)
OutputT = TypeVar("OutputT", covariant=True)


class Stage(enum.Enum):
    """What a running job is doing; names match `kiln.common.v1.Stage` without the prefix."""

    PREPROCESS = "preprocess"
    DENOISE = "denoise"
    DECODE = "decode"
    REMOVE_BACKGROUND = "remove_background"
    ENCODE = "encode"
    EXTRACT = "extract"
    EXPORT = "export"
    POSTPROCESS = "postprocess"
    VENDOR_SUBMITTED = "vendor_submitted"
    VENDOR_WAITING = "vendor_waiting"
    VENDOR_RECEIVED = "vendor_received"
    # Reported by the job runner, not by providers: the job waits for an unloaded model to load.
    LOAD_MODEL = "load_model"


class Reproducibility(enum.Enum):
    """How far a provider's results reproduce; mirrors `kiln.common.v1.Reproducibility`."""

    BITWISE_SAME_HARDWARE = "bitwise_same_hardware"
    BEST_EFFORT = "best_effort"
    NONE = "none"


@dataclass(frozen=True)
class PreviewImage:
    """A small encoded rendering of the work in progress."""

    media_type: str
    data: bytes
    width: int
    height: int


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report from a running provider."""

    stage: Stage
    step: int
    total_steps: int
    fraction: float
    preview: PreviewImage | None = None


@dataclass(frozen=True)
class ProviderDescription:
    """What a provider runs and where: feeds GetInfo and every result's provenance."""

    kind: str
    model_id: str
    model_revision: str
    device: str
    dtype: str
    library_versions: dict[str, str] = field(default_factory=dict)
    reproducibility: Reproducibility = Reproducibility.BITWISE_SAME_HARDWARE


class PhaseTimer:
    """Collects wall-clock durations of named phases in the order they ran."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - start))

    def add(self, name: str, seconds: float) -> None:
        self.phases.append((name, seconds))


class RunContext:
    """What a provider's `run` receives: progress reporting, cancellation and phase timing.

    Thread-safety: `report` and `check_cancelled` are called from the worker thread;
    `cancel` from the event loop.
    """

    def __init__(self, job_id: str, report: Callable[[ProgressUpdate], None]) -> None:
        self.job_id = job_id
        self._report = report
        self._cancelled = threading.Event()
        self.timer = PhaseTimer()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if the client went away; providers call it between steps."""
        if self._cancelled.is_set():
            raise Cancelled("the job was cancelled by the client")

    def report(self, update: ProgressUpdate) -> None:
        self.check_cancelled()
        self._report(update)

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Time a named phase of the run; it appears in the result's timings."""
        return self.timer.phase(name)


class Provider(Protocol[RequestT, OutputT]):
    """A model backend. Implementations: the fake provider, local models, vendor APIs.

    `load` and `warmup` run in a worker thread before the server reports SERVING (or before
    the first job, when loading is lazy); `run` runs in a worker thread per job and must call
    `ctx.check_cancelled()` (or `ctx.report`, which checks too) at least once per step so that
    cancellation stops it within one step; `close` frees the model at shutdown and when the
    model has been idle for `keep_alive`. `close` must drop every reference to the weights
    (the model manager then collects garbage and empties the device cache), and `load` must
    work again on the same object after `close`: an idle-unloaded model is reloaded in place.
    """

    def describe(self) -> ProviderDescription: ...

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def run(self, request: RequestT, ctx: RunContext) -> OutputT: ...

    def close(self) -> None: ...

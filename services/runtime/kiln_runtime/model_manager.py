"""Owns a provider's lifecycle and reports its readiness through `grpc.health.v1`.

Health says NOT_SERVING until the model is loaded and warm, SERVING after, and NOT_SERVING
again from the moment a shutdown starts, so Envoy and Kubernetes stop sending work before
the server stops. With `load_on_startup = false` the server reports SERVING at once and
loads on the first request instead (otherwise no balancer would ever send that request).

Keep-alive: the model itself moves through a small state machine, unloaded → loading →
loaded → unloading → unloaded, independent of health (an idle-unloaded server stays
SERVING). Jobs hold the model from admission to the end of their work (`hold`); when the
last hold ends, an idle timer of `keep_alive` seconds starts, and when it fires with no hold
taken in between the provider is closed and its memory released. A job that finds the
model unloaded asks for a load (`load_task`): concurrent jobs share one load, and a load
asked for during an unload starts after it. Loads and unloads take the same lock, so they
never overlap, and an unload re-checks the holds under that lock before it starts.

Shutdown: worker threads cannot be interrupted, so a job cancelled at the end of the grace
period may still be inside the provider. `close()` refuses new leases and waits, on the loop,
until the last running one has ended before it closes the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from grpc_health.v1 import health, health_pb2

from kiln_runtime.errors import ModelNotReady, ShuttingDown
from kiln_runtime.memory import release_memory
from kiln_runtime.provider import Provider, ProviderDescription
from kiln_runtime.telemetry.metrics import ServiceMetrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness(enum.Enum):
    """Mirrors `kiln.common.v1.Readiness`."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class ModelState(enum.Enum):
    """Whether the model's weights are in memory; GetInfo reports `loaded` for LOADED only."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class ModelHold:
    """One job's claim on the model: while any hold is open the model is never unloaded.

    Taken on the event loop at admission; released exactly once from any thread (the
    worker's, or the loop's when the job ends before its work started).
    """

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """End the claim; calling it again does nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._manager._release_hold()


class ModelManager:
    """Loads and warms the provider off the event loop, publishes readiness, unloads when idle."""

    def __init__(
        self,
        provider: Provider[Any, Any],
        *,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        metrics: ServiceMetrics,
        load_on_startup: bool = True,
        keep_alive: float | None = None,
        preflight: Callable[[], None] | None = None,
        preflight_retry_s: float = 5.0,
    ) -> None:
        self.provider = provider
        self._health = health_servicer
        self._service_names = [*service_names, ""]  # "" is the server as a whole
        self._metrics = metrics
        self._load_on_startup = load_on_startup
        self.keep_alive = keep_alive
        # What must work before any job (the object store): checked in a thread before the
        # startup load, retried until it passes, its failure a readable NOT_SERVING state.
        self._preflight = preflight
        self._preflight_retry_s = preflight_retry_s
        self._preflight_failed = False
        self._lock = asyncio.Lock()  # loads, unloads and reloads, one at a time
        self.state = ModelState.UNLOADED
        self.readiness = Readiness.LOADING
        self.reason = "the model is loading"
        self.last_load_s: float | None = None
        self.last_loaded_at: float | None = None  # time.time() when the last load finished
        # Why the last on-demand load failed, until a load succeeds: GetInfo shows it while the
        # server stays READY (the next job tries again), so an operator need not read the log.
        self.last_load_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._unload_task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Jobs lease the provider they start with, so a reload never swaps it under them;
        # a replaced provider is closed when its last lease ends.
        self._leases: dict[int, int] = {}
        self._retired: dict[int, Provider[Any, Any]] = {}
        self._lease_lock = threading.Lock()
        self._holds = 0  # guarded by _lease_lock
        # Set by close() (guarded by _lease_lock): no lease after it, and the last one to end wakes it.
        self._closing = False
        self._all_returned: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory and a job can run without a load."""
        return self.state is ModelState.LOADED

    @property
    def holds(self) -> int:
        """Jobs admitted and not finished (queued, loading or running)."""
        with self._lease_lock:
            return self._holds

    def describe(self) -> ProviderDescription:
        return self.provider.describe()

    # -- jobs --------------------------------------------------------------------------

    def hold(self) -> ModelHold:
        """Claim the model for one job (event loop): no unload until the claim is released."""
        with self._lease_lock:
            self._holds += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return ModelHold(self)

    def _release_hold(self) -> None:
        with self._lease_lock:
            self._holds -= 1
            idle = self._holds == 0
        if idle and self._loop is not None and self.keep_alive is not None:
            # Released from a worker thread; timers belong to the loop.
            # A loop closed under a shutdown has nothing left to unload for.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._arm_idle_timer)

    def load_task(self) -> asyncio.Task[None] | None:
        """The load a job must wait for, or None when the model is loaded (event loop).

        Every caller during one load gets the same task (single flight). The task raises
        `ModelNotReady`, naming the cause, when the load fails; the next call starts a new one.
        Waiters should not cancel it: other jobs may be waiting too (use `asyncio.wait`).
        """
        if self.state is ModelState.LOADED:
            return None
        if self._load_task is None or self._load_task.done():
            self._load_task = asyncio.create_task(self._load_on_demand(), name="kiln-model-load-on-demand")
            self._load_task.add_done_callback(_consume_exception)
        return self._load_task

    @contextmanager
    def lease(self) -> Iterator[Provider[Any, Any]]:
        """The current provider, kept open for the duration of one job (any thread).

        Raises `ShuttingDown` once `close()` has begun: the provider is about to go.
        """
        with self._lease_lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down; the job did not start, retry on another replica")
            provider = self.provider
            self._leases[id(provider)] = self._leases.get(id(provider), 0) + 1
        try:
            yield provider
        finally:
            with self._lease_lock:
                remaining = self._leases[id(provider)] - 1
                self._leases[id(provider)] = remaining
                retired = self._retired.pop(id(provider), None) if remaining == 0 else None
                waiter = self._all_returned if not any(self._leases.values()) else None
            if retired is not None:
                _close_and_release(retired)
            if waiter is not None:  # close() is waiting for this, the last running job
                loop, returned = waiter
                with contextlib.suppress(RuntimeError):  # a loop closed already waits for nothing
                    loop.call_soon_threadsafe(returned.set)

    # -- lifecycle ---------------------------------------------------------------------

    async def reload(self, create: Callable[[], Provider[Any, Any]]) -> bool:
        """Load a new provider beside the current one, then swap; in-flight jobs keep the old one.

        On failure the current provider keeps serving and the reason is reported in GetInfo.
        """
        async with self._lock:
            started = time.perf_counter()
            try:
                replacement = await asyncio.to_thread(create)
                await asyncio.to_thread(replacement.load)
                await asyncio.to_thread(replacement.warmup)
            except Exception as err:  # a bad new model must not take the running one down
                log.error("reload failed; still serving the previous model: %s", err, exc_info=True)
                self.reason = f"the last reload failed: {err}"
                self._metrics.count_load(ok=False)
                return False
            with self._lease_lock:
                previous, self.provider = self.provider, replacement
                idle = self._leases.get(id(previous), 0) == 0
                if not idle:
                    self._retired[id(previous)] = previous
            if idle and self.state is ModelState.LOADED:
                await asyncio.to_thread(_close_and_release, previous)
            self._record_load(time.perf_counter() - started)
            if self.readiness is not Readiness.DRAINING:
                self.readiness, self.reason = Readiness.READY, ""
                await self._publish(SERVING)
            description = replacement.describe()
            log.info(
                "reloaded in %.2f s: now %s (revision %s)",
                time.perf_counter() - started,
                description.model_id,
                description.model_revision or "-",
            )
        self._arm_idle_timer()
        return True

    async def start(self) -> None:
        """Begin loading (or, when lazy, report SERVING at once) without blocking the caller."""
        self._loop = asyncio.get_running_loop()
        await self._publish(NOT_SERVING)
        if self._preflight is not None:
            self.reason = "checking the artifact storage"
            self._task = asyncio.create_task(self._preflight_then_start(), name="kiln-preflight")
            return
        if self._load_on_startup:
            self._task = asyncio.create_task(self._startup_load(), name="kiln-model-load")
        else:
            self.readiness, self.reason = Readiness.READY, ""
            await self._publish(SERVING)

    async def _preflight_then_start(self) -> None:
        """Run the preflight until it passes (reporting each failure), then start as usual."""
        assert self._preflight is not None
        while True:
            try:
                await asyncio.to_thread(self._preflight)
                break
            except Exception as err:  # the cause is the readiness reason, not a crash
                cause = str(err) or type(err).__name__
                if self.readiness is Readiness.DRAINING:
                    return
                if cause != self.reason:
                    log.error("not serving: %s (checking again every %g s)", cause, self._preflight_retry_s)
                self._preflight_failed = True
                self.readiness, self.reason = Readiness.FAILED, cause
                await self._publish(NOT_SERVING)
            await asyncio.sleep(self._preflight_retry_s)
        if self.readiness is Readiness.DRAINING:
            return
        if self._preflight_failed:
            log.info("the startup check passes now")
        self._preflight_failed = False
        if self._load_on_startup:
            self.readiness, self.reason = Readiness.LOADING, "the model is loading"
            await self._startup_load()
        else:
            self.readiness, self.reason = Readiness.READY, ""
            await self._publish(SERVING)

    async def wait_loaded(self) -> None:
        """Wait for a startup load to finish (tests and `make up` use health instead)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def ensure_ready(self) -> None:
        """Raise `ModelNotReady` unless the server takes jobs now.

        An unloaded model is fine: the job loads it in its stream.
        """
        if self.readiness is Readiness.LOADING:
            raise ModelNotReady("the model is still loading; retry in a few seconds")
        if self.readiness is Readiness.FAILED and self._preflight_failed:
            raise ModelNotReady(f"the server cannot take jobs yet: {self.reason}")
        if self.readiness is Readiness.FAILED:
            raise ModelNotReady(f"the model failed to load: {self.reason}")

    async def _startup_load(self) -> None:
        try:
            await self._load(on_demand=False)
        except Exception:  # already a readable state (FAILED); the server keeps answering
            return
        self._arm_idle_timer()

    async def _load_on_demand(self) -> None:
        await self._load(on_demand=True)

    async def _load(self, *, on_demand: bool) -> None:
        async with self._lock:
            if self.state is ModelState.LOADED:
                return
            self.state = ModelState.LOADING
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.provider.load)
                await asyncio.to_thread(self.provider.warmup)
            except Exception as err:  # any load failure must become a readable state, not a crash
                cause = str(err) or type(err).__name__
                self.state = ModelState.UNLOADED
                self._metrics.count_load(ok=False)
                # Half-built modules of a failed load are garbage now; give their memory back too.
                try:
                    await asyncio.to_thread(_close_and_release, self.provider)
                except Exception:  # the load's own error is the one worth reporting
                    log.exception("closing the provider after its failed load failed too")
                if on_demand:
                    # The server stays SERVING: the failure may pass (memory taken by another
                    # program, a file being copied), and the next job tries again.
                    self.last_load_error = cause
                    log.error("loading the model for a job failed: %s", cause, exc_info=True)
                    raise ModelNotReady(
                        f"the model could not be loaded: {cause} (the next request tries again; "
                        "the server log has the details)"
                    ) from err
                self.readiness, self.reason = Readiness.FAILED, cause
                log.error("model load failed: %s", self.reason, exc_info=True)
                await self._publish(NOT_SERVING)
                raise
            seconds = time.perf_counter() - started
            self._record_load(seconds)
            description = self.provider.describe()
            log.info(
                "model %s in %.2f s: %s on %s (%s)",
                "loaded for a job" if on_demand else "ready",
                seconds,
                description.model_id,
                description.device,
                description.dtype,
            )
            if on_demand or self.readiness is Readiness.DRAINING:
                return
            self.readiness, self.reason = Readiness.READY, ""
            await self._publish(SERVING)

    def _record_load(self, seconds: float) -> None:
        self.state = ModelState.LOADED
        self.last_load_error = None
        self.last_load_s = seconds
        self.last_loaded_at = time.time()
        self._metrics.model_load.set(seconds)
        self._metrics.model_loaded.set(1)
        self._metrics.count_load(ok=True)

    def _arm_idle_timer(self) -> None:
        """Start the keep-alive countdown if nothing holds the model (event loop)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.keep_alive is None or self.readiness is Readiness.DRAINING or self._loop is None:
            return
        if self.holds or self.state is not ModelState.LOADED:
            return
        self._idle_timer = self._loop.call_later(self.keep_alive, self._start_unload)

    def _start_unload(self) -> None:
        self._idle_timer = None
        if self.holds or self.state is not ModelState.LOADED:
            return
        if self._unload_task is None or self._unload_task.done():
            self._unload_task = asyncio.create_task(self._unload(), name="kiln-model-unload")

    async def _unload(self) -> None:
        async with self._lock:
            # A job may have arrived between the timer and the lock; then the model stays.
            if self.holds or self.state is not ModelState.LOADED or self.readiness is Readiness.DRAINING:
                return
            self.state = ModelState.UNLOADING
            started = time.perf_counter()
            try:
                await asyncio.to_thread(_close_and_release, self.provider)
            except Exception:  # a failed close still leaves the provider unusable: treat it as unloaded
                log.exception("closing the idle model failed")
            self.state = ModelState.UNLOADED
            self._metrics.model_loaded.set(0)
            self._metrics.model_unloads.inc()
            log.info(
                "model unloaded after %s idle in %.2f s; the next job loads it again",
                f"{self.keep_alive:g} s",
                time.perf_counter() - started,
            )

    async def drain(self) -> None:
        """Report NOT_SERVING everywhere; Watch streams see it before the server stops."""
        self.readiness, self.reason = Readiness.DRAINING, "the server is shutting down"
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        await self._health.enter_graceful_shutdown()

    async def close(self) -> None:
        """Close the provider for good, after every job still running it has returned (event loop)."""
        returned = asyncio.Event()
        with self._lease_lock:
            self._closing = True
            running = sum(self._leases.values())
            if running:
                self._all_returned = (asyncio.get_running_loop(), returned)
        if running:
            log.info("waiting for %d running job(s) to return before closing the model", running)
            await returned.wait()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._unload_task is not None and not self._unload_task.done():
            await asyncio.shield(self._unload_task)  # close after it, never beside it
        if self.state is ModelState.LOADED:
            await asyncio.to_thread(self.provider.close)
            self.state = ModelState.UNLOADED

    async def _publish(self, status: int) -> None:
        for name in self._service_names:
            await self._health.set(name, status)


def _close_and_release(provider: Provider[Any, Any]) -> None:
    """Close a provider and hand the memory it held back to the device and the OS (worker thread)."""
    device = provider.describe().device
    provider.close()
    release_memory(device)


def _consume_exception(task: asyncio.Task[None]) -> None:
    # Every waiter may have left (clients gone); the failure is logged already.
    if not task.cancelled():
        task.exception()

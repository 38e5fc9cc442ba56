"""Owns a provider's lifecycle and reports its readiness through `grpc.health.v1`.

Health says NOT_SERVING until the model is loaded and warm, SERVING after, and NOT_SERVING
again from the moment a shutdown starts, so Envoy and Kubernetes stop sending work before
the server stops. With `load_on_startup = false` the server reports SERVING at once and
loads on the first request instead (otherwise no balancer would ever send that request).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from grpc_health.v1 import health, health_pb2

from kiln_runtime.errors import ModelNotReady
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


class ModelManager:
    """Loads and warms the provider off the event loop and publishes readiness."""

    def __init__(
        self,
        provider: Provider[Any, Any],
        *,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        metrics: ServiceMetrics,
        load_on_startup: bool = True,
    ) -> None:
        self.provider = provider
        self._health = health_servicer
        self._service_names = [*service_names, ""]  # "" is the server as a whole
        self._metrics = metrics
        self._load_on_startup = load_on_startup
        self._lock = asyncio.Lock()
        self._loaded = False
        self.readiness = Readiness.LOADING
        self.reason = "the model is loading"
        self._task: asyncio.Task[None] | None = None
        # Jobs lease the provider they start with, so a reload never swaps it under them;
        # a replaced provider is closed when its last lease ends.
        self._leases: dict[int, int] = {}
        self._retired: dict[int, Provider[Any, Any]] = {}
        self._lease_lock = threading.Lock()

    def describe(self) -> ProviderDescription:
        return self.provider.describe()

    @contextmanager
    def lease(self) -> Iterator[Provider[Any, Any]]:
        """The current provider, kept open for the duration of one job (any thread)."""
        with self._lease_lock:
            provider = self.provider
            self._leases[id(provider)] = self._leases.get(id(provider), 0) + 1
        try:
            yield provider
        finally:
            with self._lease_lock:
                remaining = self._leases[id(provider)] - 1
                self._leases[id(provider)] = remaining
                retired = self._retired.pop(id(provider), None) if remaining == 0 else None
            if retired is not None:
                retired.close()

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
                return False
            with self._lease_lock:
                previous, self.provider = self.provider, replacement
                idle = self._leases.get(id(previous), 0) == 0
                if not idle:
                    self._retired[id(previous)] = previous
            if idle and self._loaded:
                await asyncio.to_thread(previous.close)
            self._loaded = True
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
            return True

    async def start(self) -> None:
        """Begin loading (or, when lazy, report SERVING at once) without blocking the caller."""
        await self._publish(NOT_SERVING)
        if self._load_on_startup:
            self._task = asyncio.create_task(self._load(), name="kiln-model-load")
        else:
            self.readiness, self.reason = Readiness.READY, ""
            await self._publish(SERVING)

    async def wait_loaded(self) -> None:
        """Wait for a startup load to finish (tests and `make up` use health instead)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def ensure_ready(self) -> None:
        """Raise `ModelNotReady` unless a job can run now; loads a lazy model on first use."""
        if self.readiness is Readiness.READY and not self._loaded and not self._load_on_startup:
            await self._load()
        if self.readiness is Readiness.LOADING:
            raise ModelNotReady("the model is still loading; retry in a few seconds")
        if self.readiness is Readiness.FAILED:
            raise ModelNotReady(f"the model failed to load: {self.reason}")

    async def _load(self) -> None:
        async with self._lock:
            if self._loaded:
                return
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.provider.load)
                await asyncio.to_thread(self.provider.warmup)
            except Exception as err:  # any load failure must become a readable state, not a crash
                self.readiness, self.reason = Readiness.FAILED, str(err) or type(err).__name__
                log.error("model load failed: %s", self.reason, exc_info=True)
                await self._publish(NOT_SERVING)
                return
            self._loaded = True
            seconds = time.perf_counter() - started
            self._metrics.model_load.set(seconds)
            if self.readiness is Readiness.DRAINING:
                return
            self.readiness, self.reason = Readiness.READY, ""
            description = self.provider.describe()
            log.info(
                "model ready in %.2f s: %s on %s (%s)",
                seconds,
                description.model_id,
                description.device,
                description.dtype,
            )
            await self._publish(SERVING)

    async def drain(self) -> None:
        """Report NOT_SERVING everywhere; Watch streams see it before the server stops."""
        self.readiness, self.reason = Readiness.DRAINING, "the server is shutting down"
        await self._health.enter_graceful_shutdown()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._loaded:
            await asyncio.to_thread(self.provider.close)

    async def _publish(self, status: int) -> None:
        for name in self._service_names:
            await self._health.set(name, status)

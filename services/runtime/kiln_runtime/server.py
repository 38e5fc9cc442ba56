"""The gRPC server every Kiln model server runs: one model, its health, reflection, metrics.

`KilnServer` wires the shared pieces around a service's servicer: grpc.aio with explicit
message caps and `so_reuseport` off (a second process must fail to bind, not share the
port), the interceptor chain, `grpc.health.v1` driven by the model manager, reflection,
the Prometheus endpoint, periodic artifact cleanup, and a graceful shutdown: NOT_SERVING
first, new jobs refused, in-flight streams drained within the grace period, then stop, and
the model closed only once every worker thread still running it has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifact_pb2_grpc
from kiln_runtime.artifact_servicer import SERVICE_NAME as ARTIFACTS_SERVICE
from kiln_runtime.artifact_servicer import ArtifactServicer
from kiln_runtime.provider import Provider
from kiln_runtime.runtime import Runtime
from kiln_runtime.server_tls import describe as describe_tls
from kiln_runtime.server_tls import server_credentials
from kiln_runtime.settings import KilnSettings
from kiln_runtime.telemetry.interceptors import (
    AccessLogMetricsInterceptor,
    ErrorInterceptor,
    RequestContextInterceptor,
)
from kiln_runtime.telemetry.metrics import start_metrics_server

log = logging.getLogger(__name__)


class KilnServer:
    """A started-on-demand grpc.aio server around one `Runtime` and its servicer."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        kiln: KilnSettings,
        service_full_name: str,
        register: Callable[[grpc.aio.Server], None],
        reload_provider: Callable[[], Provider[Any, Any]] | None = None,
    ) -> None:
        self.runtime = runtime
        self._reload_provider = reload_provider
        self._kiln = kiln
        self._service_full_name = service_full_name
        settings = runtime.settings.server
        self.server = grpc.aio.server(
            interceptors=[
                RequestContextInterceptor(),
                AccessLogMetricsInterceptor(runtime.metrics),
                ErrorInterceptor(runtime.domain),
            ],
            options=[
                ("grpc.so_reuseport", 0),
                # Requests carry images up to limits.max_image_bytes, with headroom so that a larger
                # one reaches the service's INVALID_ARGUMENT instead of gRPC's RESOURCE_EXHAUSTED.
                (
                    "grpc.max_receive_message_length",
                    max(settings.max_message_bytes, runtime.settings.limits.max_request_bytes),
                ),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        )
        register(self.server)
        artifacts = ArtifactServicer(runtime.store, settings.max_message_bytes)
        artifact_pb2_grpc.add_ArtifactProviderServicer_to_server(artifacts, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(runtime.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            [service_full_name, ARTIFACTS_SERVICE, health_name, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._cleanup_task: asyncio.Task[None] | None = None
        self._usage_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING until the model is warm), return the port."""
        settings = self.runtime.settings.server
        # Read before binding: a bad certificate path stops the server with the setting's name.
        credentials = server_credentials(settings)
        address = f"{settings.host}:{settings.port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"could not bind {settings.host}:{settings.port}; is another server using it?")
        if settings.metrics_enabled:
            self._metrics_server, self.metrics_port = start_metrics_server(
                self.runtime.metrics.registry, settings.host, settings.metrics_port
            )
        await self.server.start()
        await self.runtime.manager.start()
        self.runtime.jobs.start()
        self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="kiln-storage-cleanup")
        if self.runtime.storage_guard is not None:
            self._usage_task = asyncio.create_task(
                self.runtime.storage_guard.watch(self._kiln.storage.usage_interval_s), name="kiln-storage-usage"
            )
        # Tests and benchmarks read the port from this line: it stays "HOST:PORT (metrics on N)" first.
        log.info(
            "%s serving on %s:%d (metrics on %d); gRPC transport: %s",
            self._service_full_name,
            settings.host,
            self.port,
            self.metrics_port,
            describe_tls(settings),
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new jobs, drain within `grace`, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.runtime.settings.server.shutdown_grace_s if grace is None else grace
        log.info("shutting down; draining in-flight jobs for up to %.1f s", grace)
        await self.runtime.manager.drain()
        self.runtime.admission.start_draining()
        # Jobs run apart from their streams: both get the grace period, then whatever is left is
        # cancelled (the streams by grpc, the jobs by the table, which records them CANCELLED).
        await asyncio.gather(self.runtime.jobs.drain(grace), self.server.stop(grace))
        for task in (self._cleanup_task, self._usage_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        # Cancelled jobs' worker threads cannot be interrupted: a run past the grace period goes on
        # until its next cancellation check. The runner drops what never started; the manager then
        # closes the provider only after the last running worker has let it go, so no run ever
        # finds its model closed under it.
        self.runtime.runner.shutdown()
        await self.runtime.manager.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()

    async def reload(self) -> bool:
        """Swap in the model the settings name now, without dropping in-flight streams."""
        if self._reload_provider is None:
            log.warning("this server has no reload; ignoring the request")
            return False
        log.info("reloading the model")
        return await self.runtime.manager.reload(self._reload_provider)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start the graceful shutdown once; SIGHUP reloads the model."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

    async def _cleanup_loop(self) -> None:
        """The retention sweep: once at start, then every `storage.cleanup_interval_s` until stopped."""
        storage = self._kiln.storage
        while True:
            try:
                removed = await asyncio.to_thread(self.runtime.store.cleanup, storage.retention_hours * 3600)
                self.runtime.metrics.cleanups.inc()
                if removed:
                    self.runtime.metrics.cleanup_removed.inc(removed)
                    log.info("storage cleanup removed %d job folder(s)", removed)
                    if self.runtime.storage_guard is not None:  # the freed bytes count at once
                        await asyncio.to_thread(self.runtime.storage_guard.refresh)
            except Exception:  # a failed sweep must not take the server down; the next one retries
                log.exception("storage cleanup failed")
            await asyncio.sleep(storage.cleanup_interval_s)


async def serve(server: KilnServer) -> None:
    """Run a server until SIGTERM/SIGINT has drained it."""
    server.install_signal_handlers()
    await server.start()
    await server.wait_for_termination()

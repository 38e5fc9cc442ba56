"""Prometheus metrics for one model server, on that server's own registry.

Each `ServiceMetrics` owns a `CollectorRegistry` instead of using prometheus_client's global
default: tests start several servers in one process, and registering the same metric name twice
on the global registry fails (and would mix their numbers).
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds, 1 ms to 10 min: unary calls and health checks sit at the low end, model loads and
# long generation streams at the high end.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


# Jobs per model call (dynamic batching), powers of two up to the largest allowed batch.
BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    """The metrics one model server exports, all prefixed `kiln_` and labelled with `service`.

    Metrics with more labels than `service` are the labelled parents (call `.labels(...)`, or use
    the helpers below); metrics labelled only by `service` are already bound to this service, so
    callers write `metrics.queue_depth.set(n)`.

    Attributes:
        service: The server's name, "img2img" or "mesh".
        registry: The registry every metric below is registered on; serve it with
            `start_metrics_server`.
        requests: `kiln_requests_total{service,method,code}`; `code` is the gRPC code name ("OK").
        latency: `kiln_request_duration_seconds{service,method}`.
        in_progress: `kiln_requests_in_progress{service,method}`.
        queue_depth: `kiln_queue_depth{service}`, bound: jobs waiting for a slot.
        inflight_runs: `kiln_inflight_runs{service}`, bound: jobs running on the model.
        phase: `kiln_phase_duration_seconds{service,phase}`: time spent in each job phase.
        model_load: `kiln_model_load_seconds{service}`, bound: how long the last successful model
            load (startup, on demand after an idle unload, or reload) took, warm-up included.
        model_loads: `kiln_model_loads_total{service,result}`: model loads, `result` "ok" or "failed".
        model_unloads: `kiln_model_unloads_total{service}`, bound: idle unloads (keep_alive).
        model_loaded: `kiln_model_loaded{service}`, bound: 1 while the weights are in memory, else 0.
        storage_used: `kiln_storage_used_bytes{service}`, bound: bytes the local artifact folder holds
            (recounted every `storage.usage_interval_s`, plus this server's writes since).
        storage_free: `kiln_storage_free_bytes{service}`, bound: free bytes on the artifact folder's
            filesystem, read at scrape time.
        storage_full: `kiln_storage_full_total{service,when}`: jobs refused for storage (STORAGE_FULL),
            `when` "admission" (before running) or "write" (the disk filled while storing).
        cleanups: `kiln_storage_cleanups_total{service}`, bound: retention sweeps run.
        cleanup_removed: `kiln_storage_cleanup_removed_jobs_total{service}`, bound: job folders they removed.
        batch_size: `kiln_batch_size{service}`, bound: jobs per model call, observed once per batch
            (only where dynamic batching is on; a batch of one is observed as 1).
        vae_redecodes: `kiln_vae_redecodes_total{service,reason}`: images whose VAE decode was NaN or
            all black (`reason` "nan" or "black") and were decoded again in float32 (img2img).
        compile_fallbacks: `kiln_compile_fallbacks_total{service,module}`: calls of a compiled module
            ("unet", "vae_decoder") with a shape the warm-up did not compile, run eagerly instead.
    """

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "kiln_requests",
            "gRPC calls finished, by method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kiln_request_duration_seconds",
            "gRPC call duration in seconds, from the first byte received to the status sent.",
            ["service", "method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "kiln_requests_in_progress",
            "gRPC calls currently being handled.",
            ["service", "method"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth",
            "Jobs admitted and waiting for a model slot.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.inflight_runs = Gauge(
            "kiln_inflight_runs",
            "Jobs running on the model now.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.phase = Histogram(
            "kiln_phase_duration_seconds",
            "Time a job spends in each phase (queue, decode, run, encode, deliver), in seconds.",
            ["service", "phase"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.model_load = Gauge(
            "kiln_model_load_seconds",
            "Seconds the last model load (including warm-up) took.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.model_loads = Counter(
            "kiln_model_loads",
            "Model loads (at startup, on demand after an idle unload, on reload), by result: ok or failed.",
            ["service", "result"],
            registry=self.registry,
        )
        self.model_unloads = Counter(
            "kiln_model_unloads",
            "Models unloaded after keep_alive seconds without a job.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.model_loaded = Gauge(
            "kiln_model_loaded",
            "1 while the model's weights are in memory, 0 before the first load and after an idle unload.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.storage_used = Gauge(
            "kiln_storage_used_bytes",
            "Bytes the local artifact folder holds (recounted periodically, plus this server's writes since).",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.storage_free = Gauge(
            "kiln_storage_free_bytes",
            "Free bytes on the filesystem of the local artifact folder.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.storage_full = Counter(
            "kiln_storage_full",
            "Jobs refused because artifact storage had no room (STORAGE_FULL), by when: admission or write.",
            ["service", "when"],
            registry=self.registry,
        )
        self.cleanups = Counter(
            "kiln_storage_cleanups",
            "Retention sweeps of the artifact storage run.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.cleanup_removed = Counter(
            "kiln_storage_cleanup_removed_jobs",
            "Job folders the retention sweeps removed.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)

        self.jobs = Gauge(
            "kiln_jobs",
            "Jobs this server holds in memory (running, and finished ones retained for GetJob), by state.",
            ["service", "state"],
            registry=self.registry,
        )
        self.jobs_retained_bytes = Gauge(
            "kiln_jobs_retained_bytes",
            "Approximate bytes of events (previews, chunks, inline results) held for replay to watchers.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.jobs_finished = Counter(
            "kiln_jobs_finished",
            "Jobs that reached a terminal state, by state: succeeded, failed or cancelled.",
            ["service", "state"],
            registry=self.registry,
        )
        self.jobs_abandoned = Counter(
            "kiln_jobs_abandoned",
            "Jobs cancelled because no stream watched them within the disconnect grace period.",
            ["service"],
            registry=self.registry,
        ).labels(service=service)
        self.batch_size = Histogram(
            "kiln_batch_size",
            "Jobs that shared one model call (dynamic batching), observed once per call.",
            ["service"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        ).labels(service=service)
        self.vae_redecodes = Counter(
            "kiln_vae_redecodes",
            "Images whose VAE decode was NaN or all black and were decoded again in float32, by reason.",
            ["service", "reason"],
            registry=self.registry,
        )
        self.compile_fallbacks = Counter(
            "kiln_compile_fallbacks",
            "Calls of a compiled module with a shape the warm-up did not compile (run eagerly), by module.",
            ["service", "module"],
            registry=self.registry,
        )

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """Record one finished call: count it under its status code and observe its duration.

        Args:
            method: The RPC's short name, e.g. "Generate".
            code: The gRPC status code name, e.g. "OK", "INVALID_ARGUMENT".
            seconds: Wall time the call took.
        """
        self.requests.labels(service=self.service, method=method, code=code).inc()
        self.latency.labels(service=self.service, method=method).observe(seconds)

    def observe_phase(self, phase: str, seconds: float) -> None:
        """Record the time one job spent in one phase.

        Args:
            phase: The phase name, e.g. "queue", "run".
            seconds: Wall time spent in it.
        """
        self.phase.labels(service=self.service, phase=phase).observe(seconds)

    def count_load(self, *, ok: bool) -> None:
        """Count one model load attempt.

        Args:
            ok: Whether the load (and its warm-up) succeeded.
        """
        self.model_loads.labels(service=self.service, result="ok" if ok else "failed").inc()

    def count_storage_full(self, *, when: str) -> None:
        """Count one job refused for storage.

        Args:
            when: "admission" (refused before it ran) or "write" (the disk filled while storing).
        """
        self.storage_full.labels(service=self.service, when=when).inc()

    def count_vae_redecode(self, reason: str) -> None:
        """Count one image decoded again in float32.

        Args:
            reason: "nan" (NaN or inf in the decode) or "black" (every pixel 0).
        """
        self.vae_redecodes.labels(service=self.service, reason=reason).inc()

    def count_compile_fallback(self, module: str) -> None:
        """Count one eager call of a compiled module for a shape that was not warmed.

        Args:
            module: "unet" or "vae_decoder".
        """
        self.compile_fallbacks.labels(service=self.service, module=module).inc()

    def in_progress_for(self, method: str) -> Gauge:
        """The in-progress gauge bound to this service and `method` (for `inc()`/`dec()`)."""
        return self.in_progress.labels(service=self.service, method=method)


class MetricsServer:
    """A running /metrics HTTP endpoint; `close()` (or `shutdown()`) stops it and frees the port.

    Usable as a context manager. Closing twice is harmless.
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._lock = threading.Lock()
        self._closed = False

    @property
    def port(self) -> int:
        """The TCP port the endpoint is bound to."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving, close the listening socket and wait for the serving thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    shutdown = close

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> tuple[MetricsServer, int]:
    """Serve `registry` as Prometheus text at http://host:port/metrics from a daemon thread.

    Only `host` is bound (prometheus_client would default to every interface). The caller
    decides whether to start the endpoint at all; here port 0 means "pick a free port".

    Args:
        registry: The registry to expose, normally `ServiceMetrics.registry`.
        host: The address to bind, e.g. "127.0.0.1".
        port: The TCP port; 0 picks a free one.

    Returns:
        The running server (close it on shutdown) and the port it is bound to.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    metrics_server = MetricsServer(server, thread)
    return metrics_server, metrics_server.port

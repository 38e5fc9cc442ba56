"""The per-model pieces a service and its servicer are built on, and how they are assembled.

Below the gRPC server: services and servicers import `Runtime` from here, and only the
bootstrap (`bootstrap.py`, `server.py`, `main.py`) sits above it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health

from kiln_runtime.job_api import JobMessages, JobRpcs, StoreRecorder, new_replica_id
from kiln_runtime.job_table import JobTable
from kiln_runtime.jobs import JobRunner
from kiln_runtime.limits import AdmissionController
from kiln_runtime.model_manager import ModelManager
from kiln_runtime.provider import Provider
from kiln_runtime.settings import KilnSettings, ServiceSettings, StorageSettings
from kiln_runtime.storage import ArtifactStore, open_store
from kiln_runtime.storage.budget import StorageGuard
from kiln_runtime.storage.local import LocalArtifactStore
from kiln_runtime.telemetry.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The per-model pieces a service and its servicer are built on."""

    name: str
    domain: str
    settings: ServiceSettings
    store: ArtifactStore
    metrics: ServiceMetrics
    admission: AdmissionController
    runner: JobRunner
    manager: ModelManager
    health: health.aio.HealthServicer
    # Jobs apart from their streams, and the job RPCs over them.
    jobs: JobTable
    job_rpcs: JobRpcs
    # Budget and free-space floor of a local artifact folder; None for an object store.
    storage_guard: StorageGuard | None = None


def build_runtime(
    *,
    name: str,
    service_full_name: str,
    kiln: KilnSettings,
    settings: ServiceSettings,
    provider: Provider[Any, Any],
    job_messages: JobMessages,
) -> Runtime:
    """Build the shared runtime for one model server (no sockets opened yet)."""
    metrics = ServiceMetrics(name)
    store = open_store(kiln.storage)
    guard = StorageGuard.for_settings(store.root, kiln.storage) if isinstance(store, LocalArtifactStore) else None
    if guard is not None:
        guard.export_to(metrics)
    admission = AdmissionController(
        settings.runtime.max_concurrency,
        settings.runtime.max_queue,
        principal_weights=settings.runtime.principal_weights,
        max_jobs_per_principal=settings.jobs.max_jobs_per_principal,
    )
    health_servicer = health.aio.HealthServicer()
    manager = ModelManager(
        provider,
        health_servicer=health_servicer,
        service_names=[service_full_name],
        metrics=metrics,
        load_on_startup=settings.runtime.load_on_startup,
        keep_alive=settings.runtime.keep_alive,
        preflight=_storage_preflight(store, kiln.storage),
    )
    runner = JobRunner(
        admission=admission,
        store=store,
        metrics=metrics,
        max_message_bytes=settings.server.max_message_bytes,
        max_inline_bytes=kiln.storage.max_inline_bytes,
        model=manager,
        storage_guard=guard,
    )
    domain = f"{name}.kiln.dev"
    recorder = StoreRecorder(store, job_messages, domain=domain, replica=new_replica_id(), settings=settings.jobs)
    jobs = JobTable(settings.jobs, recorder=recorder, metrics=metrics)
    return Runtime(
        name=name,
        domain=domain,
        settings=settings,
        store=store,
        metrics=metrics,
        admission=admission,
        runner=runner,
        manager=manager,
        health=health_servicer,
        jobs=jobs,
        job_rpcs=JobRpcs(jobs, recorder, job_messages, domain=domain),
        storage_guard=guard,
    )


def _storage_preflight(store: ArtifactStore, storage: StorageSettings) -> Callable[[], None] | None:
    """What must work before the server takes jobs: an object store must answer (NOT_SERVING until it does)."""
    if storage.backend != "s3":  # the local folder is created on the first write
        return None
    from kiln_runtime.storage.s3 import S3ArtifactStore  # boto3 only when chosen

    if not isinstance(store, S3ArtifactStore):
        return None
    s3_store = store

    def preflight() -> None:
        s3_store.check()
        if storage.s3.lifecycle_rule:
            try:
                s3_store.apply_lifecycle(storage.retention_hours)
            except Exception as err:  # a backstop only: cleanup() still sweeps by age
                log.warning("could not set the bucket's lifecycle rule (cleanup still runs): %s", err)

    return preflight

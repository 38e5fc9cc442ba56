"""Domain ↔ `kiln.common.v1` conversions shared by both services.

Both services' `GenerateResponse` messages have the same oneof (`accepted`, `queued`,
`progress`, `chunk`, `result`, `error`), so one function builds either from a job event;
each service passes its own response class and result builder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from kiln.common.v1 import artifact_pb2, job_pb2, service_info_pb2
from kiln_runtime.errors import FieldViolation, InvalidArgument, KilnError
from kiln_runtime.jobs import (
    AcceptedEvent,
    ChunkEvent,
    DeliveredArtifact,
    Delivery,
    ErrorEvent,
    JobEvent,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
)
from kiln_runtime.limits import AdmissionController
from kiln_runtime.model_manager import ModelManager, Readiness
from kiln_runtime.model_source import public_model_id
from kiln_runtime.provider import ProviderDescription, Reproducibility
from kiln_runtime.redaction import public_status, without_paths
from kiln_runtime.settings import ServiceSettings

ResponseT = TypeVar("ResponseT")

_DELIVERY = {
    artifact_pb2.ARTIFACT_DELIVERY_UNSPECIFIED: Delivery.DEFAULT,
    artifact_pb2.ARTIFACT_DELIVERY_INLINE: Delivery.INLINE,
    artifact_pb2.ARTIFACT_DELIVERY_CHUNKED: Delivery.CHUNKED,
    artifact_pb2.ARTIFACT_DELIVERY_REFERENCE: Delivery.REFERENCE,
}
_READINESS = {
    Readiness.LOADING: service_info_pb2.READINESS_LOADING,
    Readiness.READY: service_info_pb2.READINESS_READY,
    Readiness.FAILED: service_info_pb2.READINESS_FAILED,
    Readiness.DRAINING: service_info_pb2.READINESS_DRAINING,
}
_REPRODUCIBILITY = {
    Reproducibility.BITWISE_SAME_HARDWARE: job_pb2.REPRODUCIBILITY_BITWISE_SAME_HARDWARE,
    Reproducibility.BEST_EFFORT: job_pb2.REPRODUCIBILITY_BEST_EFFORT,
    Reproducibility.NONE: job_pb2.REPRODUCIBILITY_NONE,
}


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def delivery_from_proto(value: int) -> Delivery:
    try:
        return _DELIVERY[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument([FieldViolation("delivery", f"unknown ArtifactDelivery value {value}")]) from None


def check_enum(
    violations: list[FieldViolation], field: str, value: int, allowed: Iterable[int], enum_name: str, *, required: bool
) -> None:
    """Record a violation when an enum field is unknown, or unset where a choice is required."""
    allowed = set(allowed)
    if value == 0 and required:
        violations.append(FieldViolation(field, f"is required; choose one of the {enum_name} values"))
    elif value != 0 and value not in allowed:
        violations.append(FieldViolation(field, f"{value} is not a known {enum_name} value"))


def check_range(
    violations: list[FieldViolation],
    field: str,
    value: float,
    bounds: service_info_pb2.FloatRange | service_info_pb2.IntRange,
) -> None:
    """Record a violation when `value` is outside the range GetInfo advertises for `field`."""
    exclusive = isinstance(bounds, service_info_pb2.FloatRange) and bounds.min_exclusive
    if not ((value > bounds.min if exclusive else value >= bounds.min) and value <= bounds.max):
        opener = "(" if exclusive else "["
        violations.append(FieldViolation(field, f"{value:g} is outside {opener}{bounds.min:g}, {bounds.max:g}]"))


def check_client_request_id(violations: list[FieldViolation], value: str) -> None:
    if len(value) > 128:
        violations.append(FieldViolation("client_request_id", f"is {len(value)} characters; at most 128"))


def artifact(delivered: DeliveredArtifact) -> artifact_pb2.Artifact:
    stored = delivered.stored
    return artifact_pb2.Artifact(
        id=stored.id,
        media_type=stored.media_type,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        inline_data=delivered.inline_data,
        uri=stored.uri,
        chunk_count=delivered.chunk_count,
    )


def provenance(description: ProviderDescription) -> job_pb2.Provenance:
    return job_pb2.Provenance(
        provider=description.kind,
        model_id=public_model_id(description.model_id),
        model_revision=description.model_revision,
        device=description.device,
        dtype=description.dtype,
        library_versions=description.library_versions,
        reproducibility=_REPRODUCIBILITY[description.reproducibility],
    )


def timings(phases: Sequence[tuple[str, float]]) -> list[job_pb2.PhaseTiming]:
    return [job_pb2.PhaseTiming(phase=name, duration=duration(seconds)) for name, seconds in phases]


def progress(event: ProgressEvent) -> job_pb2.Progress:
    update = event.update
    message = job_pb2.Progress(
        stage=f"STAGE_{update.stage.name}",
        step=update.step,
        total_steps=update.total_steps,
        fraction=min(max(update.fraction, 0.0), 1.0),
    )
    if event.eta_s is not None:
        message.eta.CopyFrom(duration(event.eta_s))
    if update.preview is not None:
        preview = update.preview
        message.preview.CopyFrom(
            job_pb2.Preview(
                media_type=preview.media_type, data=preview.data, width=preview.width, height=preview.height
            )
        )
    return message


def generate_response(
    event: JobEvent,
    response_type: Callable[..., ResponseT],
    result: Callable[[ResultEvent[Any]], Any],
    domain: str,
) -> ResponseT:
    """Build a service's `GenerateResponse` for one job event."""
    if isinstance(event, AcceptedEvent):
        return response_type(accepted=job_pb2.Accepted(job_id=event.job_id, queue_position=event.position))
    if isinstance(event, QueuedEvent):
        queued = job_pb2.Queued(position=event.position)
        if event.eta_s is not None:
            queued.eta.CopyFrom(duration(event.eta_s))
        return response_type(queued=queued)
    if isinstance(event, ProgressEvent):
        return response_type(progress=progress(event))
    if isinstance(event, ChunkEvent):
        chunk = artifact_pb2.ArtifactChunk(
            artifact_id=event.artifact_id, offset=event.offset, data=event.data, last=event.last
        )
        return response_type(chunk=chunk)
    if isinstance(event, ResultEvent):
        return response_type(result=result(event))
    if isinstance(event, ErrorEvent):
        return response_type(error=public_status(event.error.to_status(domain)))
    raise TypeError(f"unknown job event {event!r}")


def model_info(manager: ModelManager, *, storage_refusal: KilnError | None = None) -> service_info_pb2.ModelInfo:
    """The model's `ModelInfo`; `storage_refusal` is why a new job would be refused for storage now."""
    description = manager.describe()
    info = service_info_pb2.ModelInfo(
        provider=description.kind,
        model_id=public_model_id(description.model_id),
        model_revision=description.model_revision,
        device=description.device,
        dtype=description.dtype,
        readiness=_READINESS[manager.readiness],
        readiness_reason=without_paths(_readiness_reason(manager, storage_refusal)),
        library_versions=description.library_versions,
        loaded=manager.loaded,
    )
    if manager.last_load_s is not None:
        info.last_load_duration.CopyFrom(duration(manager.last_load_s))
    if manager.last_loaded_at is not None:
        loaded_at = timestamp_pb2.Timestamp()
        loaded_at.FromNanoseconds(round(manager.last_loaded_at * 1e9))
        info.last_load_time.CopyFrom(loaded_at)
    if manager.keep_alive is not None:  # absent: the model stays loaded
        info.keep_alive.CopyFrom(duration(manager.keep_alive))
    return info


def _readiness_reason(manager: ModelManager, storage_refusal: KilnError | None) -> str:
    """GetInfo's `readiness_reason`: the model's own reason first.

    A full storage and a failed on-demand load keep the server READY (downloads and GetInfo
    still work, health stays SERVING, the next job may succeed) but say why new jobs are
    refused or failing.
    """
    if manager.reason:
        return manager.reason
    if storage_refusal is not None:
        return storage_refusal.message
    if manager.last_load_error is not None:
        return f"the last load of the model failed: {manager.last_load_error} (the next job tries again)"
    return ""


def server_limits(
    settings: ServiceSettings, admission: AdmissionController, max_inline_bytes: int
) -> service_info_pb2.ServerLimits:
    return service_info_pb2.ServerLimits(
        max_concurrency=admission.max_concurrency,
        max_queue=admission.max_queue,
        running=admission.running,
        queued=admission.queued,
        max_image_bytes=settings.limits.max_image_bytes,
        max_image_pixels=settings.limits.max_image_pixels,
        max_message_bytes=settings.server.max_message_bytes,
        max_inline_artifact_bytes=max_inline_bytes,
    )

"""Domain errors that carry their gRPC status, and their conversion to `google.rpc.Status`.

Code below the servicer raises these; one interceptor (telemetry/interceptors.py) turns them
into the call's status, and the job runner turns them into the in-band `error` event once a
stream has started. Messages are written for the person who sent the request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

RETRIABLE_HEADER = "kiln-retriable"
"""Response metadata set on refusals that another replica may accept (value "true").

Envoy reads headers, not `ErrorInfo`: its retry policy matches this header (`retriable-headers`)
instead of status codes, since RESOURCE_EXHAUSTED also means "message larger than max" and
STORAGE_FULL, which no retry can fix. An error before the first event is a trailers-only
response, so the header reaches Envoy with the status.
"""


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: `field` is the proto field path, `description` says why."""

    field: str
    description: str


class KilnError(Exception):
    """An error with a gRPC status code, an `ErrorInfo` reason and a human message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    #: True when the request did no work and another replica (or a later try) may accept it:
    #: the server then sets `RETRIABLE_HEADER` (ARCHITECTURE.md, "Retries").
    retriable: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def extra_details(self) -> list[any_pb2.Any]:
        """Details beyond `ErrorInfo` (BadRequest, RetryInfo, ...); subclasses add theirs."""
        return []

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Extra trailing metadata of the failed call (through the gateway, response headers)."""
        return ()

    def to_status(self, domain: str) -> status_pb2.Status:
        """The `google.rpc.Status` for this error: code, message, ErrorInfo, then extras."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=domain, metadata=self.metadata)
        details = [_pack(info), *self.extra_details()]
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


class InvalidArgument(KilnError):
    """The request is malformed; each bad field is listed as a `BadRequest` violation."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or f"invalid request: {summary}")

    def extra_details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return [_pack(bad_request)]


class Overloaded(KilnError):
    """Every slot is busy and the wait queue is full; `retry_after` says when to come back."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CAPACITY"
    retriable = True

    def __init__(self, message: str, *, retry_after_s: float, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after_s = retry_after_s

    def extra_details(self) -> list[any_pb2.Any]:
        return [_retry_info(self.retry_after_s)]


class Quota(KilnError):
    """The caller already has its limit of queued plus running jobs on this server.

    RESOURCE_EXHAUSTED with `RetryInfo` (about when one of the caller's own jobs ends), like
    CAPACITY, but not retriable: the limit is the caller's, so another try right away, by Envoy
    or the client, only asks again for what the caller was just refused.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA"

    def __init__(self, message: str, *, retry_after_s: float, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after_s = retry_after_s

    def extra_details(self) -> list[any_pb2.Any]:
        return [_retry_info(self.retry_after_s)]


class ModelNotReady(KilnError):
    """The model is loading, warming up, or failed to load."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "MODEL_NOT_READY"


class ShuttingDown(KilnError):
    """The server is draining and takes no new work; another replica can."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"
    retriable = True


class Cancelled(KilnError):
    """The job was cancelled (the client went away or asked for it)."""

    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class ProviderFailed(KilnError):
    """The provider failed while running; the message says what a user can change."""

    code = grpc.StatusCode.INTERNAL
    reason = "PROVIDER_FAILED"


class ArtifactTooLarge(KilnError):
    """An artifact cannot be delivered within the configured limits."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "ARTIFACT_TOO_LARGE"


class StorageFull(KilnError):
    """The artifact storage has no room for a job's results (budget, free-space floor, or a full disk).

    RESOURCE_EXHAUSTED is gRPC's code for "the entire file system is out of space". No
    RetryInfo: unlike CAPACITY, waiting a few seconds does not help; freeing space does.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "STORAGE_FULL"


class DeadlineExceeded(KilnError):
    """The caller's deadline passed before the work could start or finish."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class InternalError(KilnError):
    """An unexpected failure: the message carries only the request id, never internals."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"internal error; quote request id {request_id} when reporting it", metadata={"request_id": request_id}
        )


class NotFound(KilnError):
    """A named resource (an artifact) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ReplicaLost(KilnError):
    """The server that ran a job stopped before the job ended; another replica reports it.

    UNAVAILABLE, but not retriable by Envoy or the client: the job itself is gone, and only a
    new submission (a new job) can produce its result.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = "REPLICA_LOST"


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed

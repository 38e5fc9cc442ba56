"""Kiln's client exceptions: one hierarchy keyed on the gRPC status code.

Rich details (``google.rpc.ErrorInfo``, ``BadRequest``, ``RetryInfo``) are decoded from the
status, whether it arrived as the trailers of a failed call or as the in-band ``error`` event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "ChecksumError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "KilnError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_from_rpc_error",
    "error_from_status",
]


class KilnError(Exception):
    """A failed Kiln call or job.

    Attributes:
        code: The gRPC status code.
        message: The status message.
        reason: ``google.rpc.ErrorInfo.reason`` (for example ``CAPACITY``), or ``""``.
        domain: ``google.rpc.ErrorInfo.domain`` (for example ``img2img.kiln.dev``), or ``""``.
        metadata: ``google.rpc.ErrorInfo.metadata``.
        field_violations: ``(field, description)`` pairs from ``google.rpc.BadRequest``.
        retry_delay_s: Seconds the server asks to wait (``google.rpc.RetryInfo``), or None.
        request_id: The server's request id, from ``ErrorInfo.metadata`` or the
            ``x-request-id`` trailer, or ``""``.
        status: The full ``google.rpc.Status``, when the server sent one.
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_delay_s: float | None = None,
        request_id: str = "",
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_delay_s = retry_delay_s
        self.request_id = request_id
        self.status = status

    def __str__(self) -> str:
        parts = [f"{self.code.name}: {self.message}"]
        if self.reason:
            parts.append(f"reason={self.reason}")
        parts.extend(f"{field}: {description}" for field, description in self.field_violations)
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return "; ".join(parts)


class CancelledError(KilnError):
    """CANCELLED: the call was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class UnknownError(KilnError):
    """UNKNOWN: the server gave no usable status."""

    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(KilnError):
    """INVALID_ARGUMENT: a request field is invalid; see ``field_violations``."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(KilnError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(KilnError):
    """NOT_FOUND."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(KilnError):
    """ALREADY_EXISTS."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(KilnError):
    """PERMISSION_DENIED."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(KilnError):
    """RESOURCE_EXHAUSTED: the server is full; ``retry_delay_s`` says when to come back."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(KilnError):
    """FAILED_PRECONDITION: for example the model is not ready."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(KilnError):
    """ABORTED."""

    default_code = grpc.StatusCode.ABORTED


class UnimplementedError(KilnError):
    """UNIMPLEMENTED."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(KilnError):
    """INTERNAL: an unexpected server failure; quote ``request_id`` when reporting it."""

    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(KilnError):
    """UNAVAILABLE: the server cannot be reached, is not ready or is shutting down."""

    default_code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(KilnError):
    """UNAUTHENTICATED."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class ChecksumError(KilnError):
    """The received artifact bytes do not match the SHA-256 the server announced."""

    default_code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[KilnError]] = {
    cls.default_code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        UnauthenticatedError,
    )
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def _error_class(code: grpc.StatusCode) -> type[KilnError]:
    return _BY_CODE.get(code, KilnError)


def error_from_status(status: status_pb2.Status, *, request_id: str = "") -> KilnError:
    """Build the typed error for a ``google.rpc.Status`` (the in-band ``error`` event).

    Args:
        status: The status, with its details.
        request_id: Fallback request id (for example the ``x-request-id`` trailer), used when
            ``ErrorInfo.metadata`` has none.

    Returns:
        The ``KilnError`` subclass for the status code, with the details decoded.
    """
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_delay_s: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay_s = retry.retry_delay.ToTimedelta().total_seconds()
    return _error_class(code)(
        status.message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        retry_delay_s=retry_delay_s,
        request_id=metadata.get("request_id", "") or request_id,
        status=status,
    )


def error_from_rpc_error(error: grpc.RpcError) -> KilnError:
    """Build the typed error for a failed gRPC call.

    Args:
        error: The exception grpc raised; it must also be a ``grpc.Call``.

    Returns:
        The ``KilnError`` subclass for the call's status code, with rich details decoded
        from the ``grpc-status-details-bin`` trailer when present.
    """
    if not hasattr(error, "code") or not hasattr(error, "trailing_metadata"):
        return UnknownError(str(error))
    call = cast(grpc.Call, error)
    trailers = call.trailing_metadata() or ()
    request_id = next((str(value) for key, value in trailers if key == "x-request-id"), "")
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        status = None
    if status is None:
        code: grpc.StatusCode | None = call.code()
        if code is None:
            code = grpc.StatusCode.UNKNOWN
        status = status_pb2.Status(code=code.value[0], message=call.details() or "")
    error_ = error_from_status(status, request_id=request_id)
    error_.__cause__ = error
    return error_

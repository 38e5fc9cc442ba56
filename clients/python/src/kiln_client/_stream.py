"""What the img2img and mesh clients share.

Enum arguments, the event stream with bounded retries before the first event, and artifact
reassembly with SHA-256 checks. The two services' messages have the same shape but distinct
types, so the oneof members are read by name here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from kiln.common.v1 import artifact_pb2
from kiln_client.errors import ChecksumError, KilnError, error_from_rpc_error, error_from_status

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
MAX_RETRY_DELAY_S = 10.0
"""Longest wait between attempts, whatever the server's RetryInfo asks."""
_BACKOFF_S = 0.2
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

EventT = TypeVar("EventT", bound=Message)


class _EnumWrapper(Protocol):
    def Value(self, name: str) -> int: ...  # noqa: N802 (protobuf's name)


def enum_value(enum: _EnumWrapper, prefix: str, value: str | int | None) -> int:
    """Map ``"EULER"``, ``"SCHEDULER_EULER"`` or a number to the enum's number; None is 0."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    name = value.upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return enum.Value(name)
    except ValueError:
        raise ValueError(f"unknown value {value!r} for {prefix.rstrip('_').lower()}") from None


def make_channel(target: str, *, max_message_bytes: int, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    """Open a channel with explicit send and receive caps."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def stream_events(
    start: Callable[[], Iterator[EventT]],
    *,
    retries: int,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[EventT]:
    """Yield a Generate stream's events, raising ``KilnError`` on a failure.

    UNAVAILABLE and RESOURCE_EXHAUSTED before the first event are retried up to ``retries``
    times, waiting the server's RetryInfo delay (capped at ``MAX_RETRY_DELAY_S``) or a short
    exponential backoff. Once an event has arrived nothing is retried: the job exists.
    """
    attempt = 0
    while True:
        call = start()
        received = finished = False
        try:
            for event in call:
                received = True
                if event.WhichOneof("event") == "error":
                    raise error_from_status(getattr(event, "error"))  # noqa: B009 (generic event type)
                yield event
            finished = True
            return
        except grpc.RpcError as rpc_error:
            finished = True
            error = error_from_rpc_error(rpc_error)
            if received or attempt >= retries or error.code not in _RETRYABLE:
                raise error from rpc_error
        finally:
            if not finished and isinstance(call, grpc.RpcContext):
                call.cancel()  # the consumer stopped early, or the job failed in-band
        delay = error.retry_delay_s if error.retry_delay_s is not None else _BACKOFF_S * 2**attempt
        sleep(min(max(delay, 0.0), MAX_RETRY_DELAY_S))
        attempt += 1


@dataclass(frozen=True)
class Collected:
    """A finished stream: the result message and the first artifact's bytes."""

    result: Any
    artifact: artifact_pb2.Artifact
    data: bytes | None


def collect(events: Iterator[Message]) -> Collected:
    """Drain a stream, reassemble chunks and verify the first artifact's SHA-256.

    Returns:
        The result and the artifact; ``data`` is None when the artifact came by reference only.

    Raises:
        ChecksumError: Inline or reassembled bytes do not match ``Artifact.sha256``.
        KilnError: The stream failed, or ended without a result or artifact.
    """
    chunks: dict[str, bytearray] = {}
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "chunk":
            chunk: artifact_pb2.ArtifactChunk = getattr(event, "chunk")  # noqa: B009
            buffer = chunks.setdefault(chunk.artifact_id, bytearray())
            if chunk.offset != len(buffer):
                raise ChecksumError(f"chunk of {chunk.artifact_id} at offset {chunk.offset}, expected {len(buffer)}")
            buffer += chunk.data
        elif kind == "result":
            result = getattr(event, "result")  # noqa: B009
            artifacts: Sequence[artifact_pb2.Artifact] = result.artifacts
            if not artifacts:
                raise KilnError("result without an artifact")
            artifact = artifacts[0]
            data: bytes | None
            if artifact.inline_data:
                data = artifact.inline_data
            elif artifact.id in chunks:
                data = bytes(chunks[artifact.id])
            else:
                data = None
            if data is not None:
                verify(artifact, data)
            return Collected(result=result, artifact=artifact, data=data)
    raise KilnError("stream ended without a result")


def verify(artifact: artifact_pb2.Artifact, data: bytes) -> None:
    """Raise ``ChecksumError`` unless ``data`` has the artifact's size and SHA-256."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != artifact.sha256.lower() or (artifact.size_bytes and len(data) != artifact.size_bytes):
        raise ChecksumError(
            f"artifact {artifact.id}: got {len(data)} bytes with sha256 {digest}, "
            f"expected {artifact.size_bytes} bytes with sha256 {artifact.sha256}"
        )

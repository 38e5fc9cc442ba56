"""What the img2img and mesh clients share.

Enum arguments, the event stream with bounded retries before the first event, and artifact
reassembly with SHA-256 checks. The two services' messages have the same shape but distinct
types, so the oneof members are read by name here.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from kiln.common.v1 import artifact_pb2
from kiln_client.errors import ChecksumError, KilnError, error_from_rpc_error, error_from_status

MAX_RETRY_DELAY_S = 10.0
"""Longest wait between attempts, whatever the server's RetryInfo asks."""
_BACKOFF_S = 0.2

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


def stream_events(
    start: Callable[[], Iterator[EventT]],
    *,
    retries: int,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[EventT]:
    """Yield a Generate stream's events, raising ``KilnError`` on a failure.

    Before the first event, a failure that a later try can fix (`retriable`) is retried up to
    ``retries`` times, waiting the server's RetryInfo delay (capped at ``MAX_RETRY_DELAY_S``) or
    a short exponential backoff. Once an event has arrived nothing is retried: the job exists.
    """
    attempt = 0
    while True:
        call = start()
        received = finished = False
        try:
            for event in call:
                received = True
                yield _checked(event)
            finished = True
            return
        except grpc.RpcError as rpc_error:
            finished = True
            delay = _delay_before_retry(rpc_error, received=received, attempt=attempt, retries=retries)
        finally:
            if not finished and isinstance(call, grpc.RpcContext):
                call.cancel()  # the consumer stopped early, or the job failed in-band
        sleep(delay)
        attempt += 1


async def astream_events(
    start: Callable[[], AsyncIterator[EventT]],
    *,
    retries: int,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[EventT]:
    """``stream_events`` for grpc.aio calls.

    The same retry rule; the call is cancelled when the consumer stops early or the job fails in-band.
    """
    attempt = 0
    while True:
        call = start()
        received = finished = False
        try:
            async for event in call:
                received = True
                yield _checked(event)
            finished = True
            return
        except grpc.RpcError as rpc_error:
            finished = True
            delay = _delay_before_retry(rpc_error, received=received, attempt=attempt, retries=retries)
        finally:
            if not finished and isinstance(call, grpc.aio.Call):
                call.cancel()
        await sleep(delay)
        attempt += 1


def _checked(event: EventT) -> EventT:
    """The event, unless it is the in-band ``error``, which is raised as a `KilnError`."""
    if event.WhichOneof("event") == "error":
        raise error_from_status(getattr(event, "error"))  # noqa: B009 (generic event type)
    return event


def _delay_before_retry(rpc_error: grpc.RpcError, *, received: bool, attempt: int, retries: int) -> float:
    """Seconds to wait before the next attempt, or raise the call's `KilnError` if none is due."""
    error = error_from_rpc_error(rpc_error)
    if received or attempt >= retries or not retriable(error):
        raise error from rpc_error
    return _retry_delay(error, attempt)


def retriable(error: KilnError) -> bool:
    """Whether trying again can succeed (ARCHITECTURE.md, "Retries", the decision table).

    A full server (RESOURCE_EXHAUSTED, reason CAPACITY) or a draining one (UNAVAILABLE,
    SHUTTING_DOWN) did no work; UNAVAILABLE without an ``ErrorInfo`` is the connection
    (grpc's "failed to connect", or a gateway with no healthy replica). Never other
    RESOURCE_EXHAUSTED (STORAGE_FULL, a message over a transport cap), nor MODEL_NOT_READY
    (the load failed; the server keeps the reason).
    """
    if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error.reason == "CAPACITY"
    if error.code is grpc.StatusCode.UNAVAILABLE:
        return error.reason in ("", "SHUTTING_DOWN")
    return False


def _retry_delay(error: KilnError, attempt: int) -> float:
    """The server's RetryInfo delay, else exponential backoff; capped either way."""
    delay = error.retry_delay_s if error.retry_delay_s is not None else _BACKOFF_S * 2**attempt
    return min(max(delay, 0.0), MAX_RETRY_DELAY_S)


@dataclass(frozen=True)
class Collected:
    """A finished stream: the result message and the first artifact's bytes."""

    result: Any
    artifact: artifact_pb2.Artifact
    data: bytes | None


class Collector:
    """Reassembles a stream's chunks and checks the first artifact's SHA-256 on ``result``.

    Fed one event at a time, so that the sync and asyncio loops (and the CLI, which also draws
    progress) share it.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, bytearray] = {}
        self.collected: Collected | None = None

    def add(self, event: Message) -> Collected | None:
        """Take one event; returns the finished job on ``result``, else None.

        Raises:
            ChecksumError: A chunk arrived out of order, or the bytes do not match.
            KilnError: The result holds no artifact.
        """
        kind = event.WhichOneof("event")
        if kind == "chunk":
            chunk: artifact_pb2.ArtifactChunk = getattr(event, "chunk")  # noqa: B009
            buffer = self._chunks.setdefault(chunk.artifact_id, bytearray())
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
            elif artifact.id in self._chunks:
                data = bytes(self._chunks.pop(artifact.id))
            else:
                data = None
            if data is not None:
                verify(artifact, data)
            self.collected = Collected(result=result, artifact=artifact, data=data)
        return self.collected


def collect(events: Iterator[Message]) -> Collected:
    """Drain a stream, reassemble chunks and verify the first artifact's SHA-256.

    Returns:
        The result and the artifact; ``data`` is None when the artifact came by reference only.

    Raises:
        ChecksumError: Inline or reassembled bytes do not match ``Artifact.sha256``.
        KilnError: The stream failed, or ended without a result or artifact.
    """
    collector = Collector()
    for event in events:
        if (collected := collector.add(event)) is not None:
            return collected
    raise KilnError("stream ended without a result")


async def acollect(events: AsyncIterator[Message]) -> Collected:
    """``collect`` for an asyncio stream."""
    collector = Collector()
    async for event in events:
        if (collected := collector.add(event)) is not None:
            return collected
    raise KilnError("stream ended without a result")


def verify(artifact: artifact_pb2.Artifact, data: bytes) -> None:
    """Raise ``ChecksumError`` unless ``data`` has the artifact's size and SHA-256."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != artifact.sha256.lower() or (artifact.size_bytes and len(data) != artifact.size_bytes):
        raise ChecksumError(
            f"artifact {artifact.id}: got {len(data)} bytes with sha256 {digest}, "
            f"expected {artifact.size_bytes} bytes with sha256 {artifact.sha256}"
        )

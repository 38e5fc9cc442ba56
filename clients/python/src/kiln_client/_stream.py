"""What the img2img and mesh clients share.

Enum arguments, the event stream (bounded retries before the job exists, resumed with WatchJob
when it breaks after), and artifact reassembly with SHA-256 checks. The two services' messages
have the same shape but distinct types, so the oneof members are read by name here.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from kiln.common.v1 import artifact_pb2, job_pb2
from kiln_client._resume import JobCursor
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


def delivery(value: str | int | None) -> int:
    """``"CHUNKED"``, ``"ARTIFACT_DELIVERY_CHUNKED"`` or a number → the ``ArtifactDelivery`` number."""
    return enum_value(artifact_pb2.ArtifactDelivery, "ARTIFACT_DELIVERY_", value)


def disconnect_policy(value: str | int | None) -> int:
    """``"DETACH"``, ``"DISCONNECT_POLICY_DETACH"`` or a number → the ``DisconnectPolicy`` number."""
    return enum_value(job_pb2.DisconnectPolicy, "DISCONNECT_POLICY_", value)


def stream_events(
    open_call: Callable[[JobCursor], Iterator[EventT]],
    cursor: JobCursor,
    *,
    retries: int,
    on_first_event: Callable[[Any, JobCursor], None] | None = None,
    on_abandon: Callable[[JobCursor], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[EventT]:
    """Yield one job's events across the calls that carry them, raising ``KilnError`` on a failure.

    ``open_call(cursor)`` starts the next call: ``Generate`` until the job exists, then
    ``WatchJob`` after ``cursor.last_sequence``. Before the job exists, a failure that a later
    try can fix (`retriable`) is retried up to ``retries`` times, waiting the server's RetryInfo
    delay (capped at ``MAX_RETRY_DELAY_S``) or a short exponential backoff; a retried submit
    carries the same ``client_request_id``, so the server attaches it to the job the first try
    created. After that a broken stream is resumed while `JobCursor.resume_delay` allows, and
    duplicates are dropped (`JobCursor.take`).

    Args:
        open_call: Starts the next call for the cursor.
        cursor: The job's position; updated as events arrive.
        retries: Retries before the job exists.
        on_first_event: Called with each call and the cursor once the call's first event is in
            (its initial metadata has arrived: the gateway's session header).
        on_abandon: Called when the caller leaves before the job ended (it stopped iterating,
            or an exception such as KeyboardInterrupt came through); not after a failure.
        sleep: Waits between attempts (tests pass their own).
    """
    attempt = 0
    while True:
        call = open_call(cursor)
        first = True
        try:
            for event in call:
                fresh = cursor.take(event)
                if first:
                    first = False
                    if on_first_event is not None:
                        on_first_event(call, cursor)
                if fresh:
                    yield _checked(event)
            return
        except grpc.RpcError as rpc_error:
            delay = _next_delay(cursor, rpc_error, attempt=attempt, retries=retries)
        except KilnError:
            _cancel(call)  # the job failed in-band, or its events did not add up
            raise
        except BaseException:
            _cancel(call)
            if on_abandon is not None and cursor.started and not cursor.ended:
                on_abandon(cursor)
            raise
        sleep(delay)
        attempt += 1


async def astream_events(
    open_call: Callable[[JobCursor], AsyncIterator[EventT]],
    cursor: JobCursor,
    *,
    retries: int,
    on_first_event: Callable[[Any, JobCursor], Awaitable[None]] | None = None,
    on_abandon: Callable[[JobCursor], Awaitable[None]] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[EventT]:
    """``stream_events`` for grpc.aio calls: the same rules, with awaited hooks.

    Leaving early is ``aclose()``, or the consuming task being cancelled.
    """
    attempt = 0
    while True:
        call = open_call(cursor)
        first = True
        try:
            async for event in call:
                fresh = cursor.take(event)
                if first:
                    first = False
                    if on_first_event is not None:
                        await on_first_event(call, cursor)
                if fresh:
                    yield _checked(event)
            return
        except grpc.RpcError as rpc_error:
            delay = _next_delay(cursor, rpc_error, attempt=attempt, retries=retries)
        except KilnError:
            _cancel(call)
            raise
        except BaseException:
            _cancel(call)
            if on_abandon is not None and cursor.started and not cursor.ended:
                await on_abandon(cursor)
            raise
        await sleep(delay)
        attempt += 1


def _cancel(call: object) -> None:
    """Cancel a call that is still running (no-op once it ended)."""
    if isinstance(call, (grpc.RpcContext, grpc.aio.Call)):
        call.cancel()


def _checked(event: EventT) -> EventT:
    """The event, unless it is the in-band ``error``, which is raised as a `KilnError`."""
    if event.WhichOneof("event") == "error":
        raise error_from_status(getattr(event, "error"))  # noqa: B009 (generic event type)
    return event


def _next_delay(cursor: JobCursor, rpc_error: grpc.RpcError, *, attempt: int, retries: int) -> float:
    """Seconds to wait before the next call, or raise the call's `KilnError` if none is due."""
    error = error_from_rpc_error(rpc_error)
    if cursor.started:
        delay = cursor.resume_delay(error)
    elif attempt < retries and retriable(error):
        delay = _retry_delay(error, attempt)
    else:
        delay = None
    if delay is None:
        raise error from rpc_error
    return delay


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
    """A finished stream: the job, the result message and the first artifact's bytes."""

    result: Any
    artifact: artifact_pb2.Artifact
    data: bytes | None
    job_id: str = ""


class Collector:
    """Reassembles a stream's chunks and checks the first artifact's SHA-256 on ``result``.

    Fed one event at a time, so that the sync and asyncio loops (and the CLI, which also draws
    progress) share it.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, bytearray] = {}
        self.job_id = ""
        self.collected: Collected | None = None

    def add(self, event: Message) -> Collected | None:
        """Take one event; returns the finished job on ``result``, else None.

        Raises:
            ChecksumError: A chunk arrived out of order, or the bytes do not match.
            KilnError: The result holds no artifact.
        """
        kind = event.WhichOneof("event")
        if kind == "accepted":
            self.job_id = getattr(event, "accepted").job_id  # noqa: B009
        elif kind == "chunk":
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
            data: bytes | None = None
            chunks = self._chunks.pop(artifact.id, None)
            if artifact.inline_data:
                data = artifact.inline_data
            elif chunks is not None and (len(chunks) >= artifact.size_bytes or not artifact.size_bytes):
                data = bytes(chunks)
            # Else the bytes came by reference, or a compacted job's replay dropped its chunks
            # (`bytes_missing`): they are fetched from storage, not guessed from a partial buffer.
            if data is not None:
                verify(artifact, data)
            self.collected = Collected(result=result, artifact=artifact, data=data, job_id=self.job_id)
        return self.collected


#: Deliveries that always put the bytes in the stream, inline or as chunks, never by reference only.
_BYTES_IN_STREAM = frozenset({artifact_pb2.ARTIFACT_DELIVERY_INLINE, artifact_pb2.ARTIFACT_DELIVERY_CHUNKED})


def bytes_missing(collected: Collected, delivery: int) -> bool:
    """Whether the stream should have carried the artifact's bytes but did not.

    A finished job's retained events are compacted once nobody has watched it for a while: its
    chunk events are dropped and inline bytes removed from the result (the artifact keeps its id
    and URI). A replay of such a job lacks bytes that the request asked to travel in the stream
    (INLINE or CHUNKED), or that the result says came as chunks; the caller fetches them from
    storage. (With the default delivery, no bytes may also mean "by reference": left as it is.)
    """
    if collected.data is not None:
        return False
    return collected.artifact.chunk_count > 0 or delivery in _BYTES_IN_STREAM


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

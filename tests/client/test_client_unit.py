"""The sync client against a scripted server (grpc_testing): errors, retries, chunks, checksums."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from kiln.common.v1 import artifact_pb2, job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln_client import (
    SESSION_HEADER,
    ChecksumError,
    Img2ImgClient,
    InternalError,
    InvalidArgumentError,
    KilnError,
    ResourceExhaustedError,
    UnavailableError,
    _stream,
    cli,
)
from kiln_client._resume import JobCursor
from kiln_client._session import JobSessions
from kiln_client.errors import error_from_status

GENERATE = pb.DESCRIPTOR.services_by_name["Img2ImgProvider"].methods_by_name["Generate"]
T = TypeVar("T")


@pytest.fixture
def channel() -> grpc_testing.Channel:
    return grpc_testing.channel([pb.DESCRIPTOR.services_by_name["Img2ImgProvider"]], grpc_testing.strict_real_time())


@pytest.fixture
def run_client() -> Iterator[Callable[[Callable[[], T]], Future[T]]]:
    with ThreadPoolExecutor(max_workers=1) as pool:

        def submit(fn: Callable[[], T]) -> Future[T]:
            return pool.submit(fn)

        yield submit


def _pack(*messages: Any) -> list[any_pb2.Any]:
    packed = []
    for message in messages:
        detail = any_pb2.Any()
        detail.Pack(message)
        packed.append(detail)
    return packed


def _terminate(rpc: Any, status: status_pb2.Status, extra: tuple[tuple[str, str], ...] = ()) -> None:
    rich = rpc_status.to_status(status)
    rpc.terminate(tuple(rich.trailing_metadata) + extra, rich.code, rich.details)


def _artifact(data: bytes, *, inline: bool, sha256: str | None = None) -> artifact_pb2.Artifact:
    return artifact_pb2.Artifact(
        id="job1/image.png",
        media_type="image/png",
        size_bytes=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        inline_data=data if inline else b"",
        chunk_count=0 if inline else 2,
    )


def _result(artifact: artifact_pb2.Artifact) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        result=pb.Result(artifacts=[artifact], parameters=pb.EffectiveParameters(seed=42), width=96, height=64)
    )


ACCEPTED = pb.GenerateResponse(accepted=job_pb2.Accepted(job_id="job1"))


def test_invalid_argument_with_bad_request_is_not_retried(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10, retries=2)
    future = run_client(lambda: client.generate_image(b"img", prompt="", steps=500))
    _, request, rpc = channel.take_unary_stream(GENERATE)
    assert request.num_inference_steps == 500
    assert request.scheduler == pb.SCHEDULER_EULER
    assert request.output_format == pb.IMAGE_FORMAT_PNG
    assert not request.HasField("seed")
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="2 invalid fields",
        details=_pack(
            error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="img2img.kiln.dev"),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="prompt", description="required"),
                    error_details_pb2.BadRequest.FieldViolation(
                        field="num_inference_steps", description="must be in [1, 150]"
                    ),
                ]
            ),
        ),
    )
    _terminate(rpc, status, (("x-request-id", "req-7"),))
    with pytest.raises(InvalidArgumentError) as caught:
        future.result(timeout=10)
    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "2 invalid fields"
    assert error.reason == "INVALID_ARGUMENT"
    assert error.domain == "img2img.kiln.dev"
    assert error.field_violations == [("prompt", "required"), ("num_inference_steps", "must be in [1, 150]")]
    assert error.retry_delay_s is None
    assert error.request_id == "req-7"


def test_resource_exhausted_is_retried_after_the_servers_delay(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10, retries=2)
    future = run_client(lambda: client.generate_image(b"img", prompt="a cat", seed=42))
    _, _, first = channel.take_unary_stream(GENERATE)
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message="queue full",
        details=_pack(
            error_details_pb2.ErrorInfo(reason="CAPACITY"),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=50_000_000)),
        ),
    )
    _terminate(first, status)
    refused_at = time.monotonic()
    _, request, second = channel.take_unary_stream(GENERATE)
    waited = time.monotonic() - refused_at
    assert request.seed == 42
    assert waited >= 0.045
    data = b"\x89PNG fake image"
    second.send_initial_metadata(())  # as a real server does before its first message
    second.send_response(ACCEPTED)
    second.send_response(_result(_artifact(data, inline=True)))
    second.terminate((), grpc.StatusCode.OK, "")
    result = future.result(timeout=10)
    assert result.image == data
    assert result.seed == 42
    assert (result.width, result.height) == (96, 64)


def test_retries_give_up_with_the_last_error(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10, retries=1)
    future = run_client(lambda: client.generate_image(b"img", prompt="a cat"))
    for _ in range(2):
        _, _, rpc = channel.take_unary_stream(GENERATE)
        rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "not ready")
    with pytest.raises(UnavailableError, match="not ready"):
        future.result(timeout=10)


def test_mid_stream_error_event_raises_with_its_reason(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10, retries=2)
    seen: list[str] = []

    def consume() -> None:
        for event in client.generate(b"img", prompt="a cat"):
            seen.append(str(event.WhichOneof("event")))

    future = run_client(consume)
    _, _, rpc = channel.take_unary_stream(GENERATE)
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="provider failed at step 3",
        details=_pack(
            error_details_pb2.ErrorInfo(
                reason="PROVIDER_FAILED", domain="img2img.kiln.dev", metadata={"request_id": "req-9"}
            )
        ),
    )
    rpc.send_initial_metadata(())
    rpc.send_response(ACCEPTED)
    rpc.send_response(pb.GenerateResponse(progress=job_pb2.Progress(stage=job_pb2.STAGE_DENOISE, step=3)))
    rpc.send_response(pb.GenerateResponse(error=status))
    # The status in the trailers follows the event; the client must act on the event alone
    # (and cancel the call), as a real server's trailers could be arbitrarily late.
    with pytest.raises(InternalError) as caught:
        future.result(timeout=10)
    rpc.cancelled()
    assert caught.value.reason == "PROVIDER_FAILED"
    assert caught.value.request_id == "req-9"
    assert seen == ["accepted", "progress"]


def test_chunked_delivery_is_reassembled(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10)
    future = run_client(lambda: client.generate_image(b"img", prompt="a cat", delivery="CHUNKED"))
    _, request, rpc = channel.take_unary_stream(GENERATE)
    assert request.delivery == artifact_pb2.ARTIFACT_DELIVERY_CHUNKED
    data = bytes(range(256)) * 10
    rpc.send_initial_metadata(())
    rpc.send_response(ACCEPTED)
    rpc.send_response(
        pb.GenerateResponse(chunk=artifact_pb2.ArtifactChunk(artifact_id="job1/image.png", offset=0, data=data[:1000]))
    )
    rpc.send_response(
        pb.GenerateResponse(
            chunk=artifact_pb2.ArtifactChunk(artifact_id="job1/image.png", offset=1000, data=data[1000:], last=True)
        )
    )
    rpc.send_response(_result(_artifact(data, inline=False)))
    rpc.terminate((), grpc.StatusCode.OK, "")
    result = future.result(timeout=10)
    assert result.image == data
    assert result.media_type == "image/png"


def test_wrong_checksum_raises_checksum_error(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10)
    future = run_client(lambda: client.generate_image(b"img", prompt="a cat", delivery="CHUNKED"))
    _, _, rpc = channel.take_unary_stream(GENERATE)
    data = b"the real bytes"
    rpc.send_initial_metadata(())
    rpc.send_response(ACCEPTED)
    rpc.send_response(
        pb.GenerateResponse(chunk=artifact_pb2.ArtifactChunk(artifact_id="job1/image.png", data=data, last=True))
    )
    rpc.send_response(_result(_artifact(data, inline=False, sha256=hashlib.sha256(b"other").hexdigest())))
    rpc.terminate((), grpc.StatusCode.OK, "")
    with pytest.raises(ChecksumError):
        future.result(timeout=10)


def test_error_from_status_maps_codes_to_classes() -> None:
    error = error_from_status(status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="full"))
    assert isinstance(error, ResourceExhaustedError)
    unknown = error_from_status(status_pb2.Status(code=99, message="?"))
    assert type(unknown) is not ResourceExhaustedError and isinstance(unknown, KilnError)
    assert unknown.code is grpc.StatusCode.UNKNOWN


def test_unknown_enum_name_is_rejected_before_any_call(channel: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10)
    with pytest.raises(ValueError, match="scheduler"):
        next(client.generate(b"img", prompt="a cat", scheduler="NOPE"))


# --- jobs: resuming a broken stream, the idempotency key, the gateway session ------------------

WATCH_JOB = pb.DESCRIPTOR.services_by_name["Img2ImgProvider"].methods_by_name["WatchJob"]
CANCEL_JOB = pb.DESCRIPTOR.services_by_name["Img2ImgProvider"].methods_by_name["CancelJob"]


def _event(sequence: int, **event: Any) -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, **event)


def _progress(sequence: int, step: int) -> pb.GenerateResponse:
    return _event(sequence, progress=job_pb2.Progress(stage=job_pb2.STAGE_DENOISE, step=step, total_steps=3))


def _accepted(sequence: int = 1) -> pb.GenerateResponse:
    return _event(sequence, accepted=job_pb2.Accepted(job_id="job1"))


def _until(condition: Callable[[], bool]) -> None:
    """Wait for the client thread: grpc_testing drops unread responses when a call is terminated."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the client did not get there"
        time.sleep(0.005)


def _broken_after_accepted(channel: Any, run_client: Any, client: Img2ImgClient) -> Future[list[int]]:
    """Start a stream whose connection drops right after `accepted`; the future has its sequences."""
    seen: list[int] = []

    def consume() -> list[int]:
        for event in client.generate(b"img", prompt="a cat"):
            seen.append(event.sequence)
        return seen

    future: Future[list[int]] = run_client(consume)
    _, _, generate = channel.take_unary_stream(GENERATE)
    generate.send_initial_metadata(())
    generate.send_response(_accepted())
    _until(lambda: seen == [1])
    generate.terminate((), grpc.StatusCode.UNAVAILABLE, "Socket closed")
    return future


def _sequenced_result(sequence: int, data: bytes) -> pb.GenerateResponse:
    response = _result(_artifact(data, inline=True))
    response.sequence = sequence
    return response


def test_a_stream_broken_after_accepted_resumes_from_its_last_event(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10)
    seen: list[int] = []

    def consume() -> Any:
        collector = _stream.Collector()
        for event in client.generate(b"img", prompt="a cat"):
            seen.append(event.sequence)
            collector.add(event)
        return collector.collected

    future = run_client(consume)
    _, request, generate = channel.take_unary_stream(GENERATE)
    assert str(uuid.UUID(request.client_request_id, version=4)) == request.client_request_id
    generate.send_initial_metadata(((SESSION_HEADER, "replica-a"),))
    generate.send_response(_accepted())
    generate.send_response(_progress(2, 1))
    _until(lambda: len(seen) == 2)
    generate.terminate((), grpc.StatusCode.UNAVAILABLE, "Socket closed")  # the connection dropped
    metadata, watch, rpc = channel.take_unary_stream(WATCH_JOB)
    assert (watch.job_id, watch.after_sequence) == ("job1", 2)
    assert (SESSION_HEADER, "replica-a") in metadata  # back to the replica that runs the job
    rpc.send_initial_metadata(())
    rpc.send_response(_progress(2, 1))  # already seen: dropped
    rpc.send_response(_progress(3, 2))
    rpc.send_response(_sequenced_result(4, b"the image"))
    rpc.terminate((), grpc.StatusCode.OK, "")
    collected = future.result(timeout=10)
    assert seen == [1, 2, 3, 4]
    assert collected.data == b"the image" and collected.job_id == "job1"
    assert client.sessions.get("job1") == "replica-a"


def test_a_gap_in_a_resumed_stream_is_an_error(channel: Any, run_client: Any) -> None:
    future = _broken_after_accepted(channel, run_client, Img2ImgClient.from_channel(channel, timeout=10))
    _, _, rpc = channel.take_unary_stream(WATCH_JOB)
    rpc.send_initial_metadata(())
    rpc.send_response(_progress(3, 2))  # 2 never came
    with pytest.raises(KilnError, match="events 2 to 2 are missing") as caught:
        future.result(timeout=10)
    assert caught.value.code is grpc.StatusCode.DATA_LOSS
    rpc.cancelled()


def test_a_submit_broken_before_accepted_is_sent_again_with_the_same_key(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10, retries=1)
    future = run_client(lambda: client.generate_image(b"img", prompt="a cat"))
    _, first, rpc = channel.take_unary_stream(GENERATE)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "Connection reset by peer")
    _, second, rpc = channel.take_unary_stream(GENERATE)
    assert second.client_request_id == first.client_request_id != ""
    rpc.send_initial_metadata(())
    rpc.send_response(_accepted())
    rpc.send_response(_sequenced_result(2, b"once"))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert future.result(timeout=10).image == b"once"


def test_resuming_stops_after_the_window(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10, resume_window_s=0.5)
    future = _broken_after_accepted(channel, run_client, client)
    attempts: list[int] = []

    def refuse_every_watch() -> None:  # left blocked for good once the client gives up
        while True:
            _, watch, rpc = channel.take_unary_stream(WATCH_JOB)
            attempts.append(watch.after_sequence)
            rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "still down")

    threading.Thread(target=refuse_every_watch, daemon=True).start()
    with pytest.raises(UnavailableError, match="still down"):
        future.result(timeout=10)
    assert attempts in ([1], [1, 1])  # after 0.2 s, then 0.3 s: the window (0.5 s) is over


def test_in_band_errors_and_refusals_are_not_resumed() -> None:
    cursor = JobCursor("job1")
    assert cursor.take(_accepted())
    assert cursor.resumable(UnavailableError("Socket closed"))
    assert cursor.resumable(UnavailableError("draining", reason="SHUTTING_DOWN"))
    assert not cursor.resumable(UnavailableError("the replica that ran it is gone", reason="REPLICA_LOST"))
    assert cursor.resumable(InternalError("Received RST_STREAM with error code 2"))
    assert not cursor.resumable(InternalError("provider failed", reason="PROVIDER_FAILED"))
    assert not cursor.resumable(KilnError("deadline", code=grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not cursor.resumable(ResourceExhaustedError("message larger than max"))
    assert cursor.take(_event(2, error=status_pb2.Status(code=code_pb2.CANCELLED)))
    assert cursor.ended and not cursor.resumable(UnavailableError("Socket closed"))
    unsequenced = JobCursor()
    assert unsequenced.take(ACCEPTED)  # a server from before jobs: no sequence, no resume
    assert unsequenced.started and not unsequenced.resumable(UnavailableError("Socket closed"))


def test_the_cursor_drops_duplicates_and_allows_a_gap_only_before_the_outcome() -> None:
    cursor = JobCursor("job1", after=2)
    assert not cursor.take(_progress(2, 1))
    assert cursor.take(_progress(3, 2))
    # A compacted job's chunks, or the progress a stored record does not keep, before its result.
    assert cursor.take(_sequenced_result(7, b"x"))
    assert (cursor.last_sequence, cursor.skipped, cursor.ended) == (7, 3, True)


def test_the_resume_window_restarts_after_each_event() -> None:
    now = [0.0]
    cursor = JobCursor("job1", window_s=10, clock=lambda: now[0])
    broken = UnavailableError("Socket closed")
    assert cursor.resume_delay(broken) == pytest.approx(0.2)
    now[0] = 9.0
    assert cursor.resume_delay(broken) == pytest.approx(0.4)
    now[0] = 10.0
    assert cursor.resume_delay(broken) is None  # ten seconds without an event
    assert cursor.take(_accepted())
    assert cursor.resume_delay(broken) == pytest.approx(0.2)  # progress: a new window


def test_sessions_are_remembered_per_job_and_the_oldest_forgotten() -> None:
    sessions = JobSessions(capacity=2)
    sessions.note("a", ((SESSION_HEADER, b"one"),))
    sessions.note("b", (("other", "x"),))  # no session: nothing remembered
    sessions.remember("c", "three")
    sessions.get("a")  # recently used
    sessions.remember("d", "four")
    assert (sessions.get("a"), sessions.get("b"), sessions.get("c"), sessions.get("d")) == ("one", None, None, "four")
    assert sessions.metadata("a", (("authorization", "Bearer k"),)) == (
        ("authorization", "Bearer k"),
        (SESSION_HEADER, "one"),
    )
    assert sessions.metadata("zzz", ()) == ()


def test_leaving_the_stream_cancels_the_job_unless_it_is_detached(channel: Any, run_client: Any) -> None:
    client = Img2ImgClient.from_channel(channel, timeout=10)

    def leave_after_accepted(**options: Any) -> None:
        events = client.generate(b"img", prompt="a cat", **options)
        next(events)
        events.close()

    future = run_client(leave_after_accepted)
    _, _, rpc = channel.take_unary_stream(GENERATE)
    rpc.send_initial_metadata(((SESSION_HEADER, "replica-b"),))
    rpc.send_response(_accepted())
    metadata, cancel, unary = channel.take_unary_unary(CANCEL_JOB)
    assert cancel.job_id == "job1" and (SESSION_HEADER, "replica-b") in metadata
    unary.terminate(pb.CancelJobResponse(), (), grpc.StatusCode.OK, "")
    future.result(timeout=10)
    rpc.cancelled()
    detached = run_client(lambda: leave_after_accepted(on_disconnect="DETACH"))
    _, request, rpc = channel.take_unary_stream(GENERATE)
    assert request.on_disconnect == job_pb2.DISCONNECT_POLICY_DETACH
    rpc.send_initial_metadata(())
    rpc.send_response(_accepted())
    detached.result(timeout=10)
    rpc.cancelled()  # the stream is closed, and no CancelJob follows


def test_a_lost_replica_is_not_reported_as_an_unreachable_target() -> None:
    lost = UnavailableError("the server that ran this job stopped; submit it again", reason="REPLICA_LOST")
    assert cli._error_line(lost, "gw:8080", None) == (
        "unavailable [REPLICA_LOST]: the server that ran this job stopped; submit it again"
    )
    assert cli._error_line(UnavailableError("connection refused"), "gw:8080", None).startswith("cannot use gw:8080: ")

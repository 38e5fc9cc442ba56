"""The sync client against a scripted server (grpc_testing): errors, retries, chunks, checksums."""

from __future__ import annotations

import hashlib
import time
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
    ChecksumError,
    Img2ImgClient,
    InternalError,
    InvalidArgumentError,
    KilnError,
    ResourceExhaustedError,
    UnavailableError,
)
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

"""The Generate stream over a real port with the fake provider: order, errors, delivery, cancellation."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from kiln.common.v1 import artifact_pb2, job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from tests.servers import StartServer
from tests.support import img2img_request, png_bytes


def kinds(events: list[img2img.GenerateResponse]) -> list[str]:
    return [e.WhichOneof("event") or "" for e in events]


def unpack(status: object, message_type: type) -> object | None:
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(message_type.DESCRIPTOR):  # type: ignore[attr-defined]
            value = message_type()
            detail.Unpack(value)
            return value
    return None


async def collect(
    call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
    into: list[img2img.GenerateResponse] | None = None,
) -> list[img2img.GenerateResponse]:
    """All remaining events (also appended to `into`, which survives an error).

    Uses read() so that tests may read() the first events themselves.
    """
    events = [] if into is None else into
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def test_event_order_accepted_progress_result(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 4}, storage={"local_path_uris": True})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    events = await collect(stub.Generate(img2img_request(preview_every_n_steps=2)))

    assert kinds(events) == ["accepted", "progress", "progress", "progress", "progress", "result"]
    accepted = events[0].accepted
    assert len(accepted.job_id) == 26 and accepted.queue_position == 0
    steps = [e.progress.step for e in events[1:-1]]
    assert steps == [1, 2, 3, 4]
    assert [e.progress.total_steps for e in events[1:-1]] == [4] * 4
    assert [bool(e.progress.preview.data) for e in events[1:-1]] == [False, True, False, True]
    fractions = [e.progress.fraction for e in events[1:-1]]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)

    result = events[-1].result
    assert result.parameters.seed == 7
    assert result.parameters.scheduler == img2img.SCHEDULER_EULER
    assert result.parameters.strength == pytest.approx(0.75)  # default filled in
    assert result.provenance.provider == "fake" and result.provenance.device == "cpu"
    assert result.width % 8 == 0 and result.height % 8 == 0
    (artifact,) = result.artifacts
    assert artifact.media_type == "image/png"
    assert artifact.id.startswith(accepted.job_id + "/")
    assert hashlib.sha256(artifact.inline_data).hexdigest() == artifact.sha256
    assert artifact.size_bytes == len(artifact.inline_data)
    stored = Path(artifact.uri.removeprefix("file://"))
    assert stored.read_bytes() == artifact.inline_data
    phases = [t.phase for t in result.timings]
    assert phases[:2] == ["preprocess", "queue"] and "denoise" in phases and "store" in phases


async def test_same_seed_same_bytes(start_server: StartServer) -> None:
    _, channel = await start_server()
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    first = (await collect(stub.Generate(img2img_request(seed=11))))[-1].result.artifacts[0]
    second = (await collect(stub.Generate(img2img_request(seed=11))))[-1].result.artifacts[0]
    other = (await collect(stub.Generate(img2img_request(seed=12))))[-1].result.artifacts[0]
    assert first.sha256 == second.sha256 != other.sha256
    assert first.id != second.id  # a new job and artifact every time


async def test_second_client_sees_queued_with_position(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 3, "step_delay_s": 0.1})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    first = stub.Generate(img2img_request())
    assert (await first.read()).WhichOneof("event") == "accepted"
    second_events = await collect(stub.Generate(img2img_request()))
    await collect(first)

    assert second_events[0].accepted.queue_position == 1
    assert kinds(second_events)[1] == "queued"
    assert second_events[1].queued.position == 1
    assert kinds(second_events)[-1] == "result"
    assert kinds(second_events).count("progress") == 3


async def test_mid_stream_failure_is_in_band_error_and_call_status(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 5, "fail_at_step": 3})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(img2img_request())
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(call, into=events)

    assert kinds(events) == ["accepted", "progress", "progress", "error"]
    error = events[-1].error
    assert error.code == code_pb2.INTERNAL
    assert "step 3" in error.message
    info = unpack(error, error_details_pb2.ErrorInfo)
    assert info is not None and info.reason == "PROVIDER_FAILED" and info.domain == "img2img.kiln.dev"  # type: ignore[attr-defined]
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    trailer_status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert trailer_status is not None and trailer_status.message == error.message
    await _wait_for(lambda: server.runtime.admission.running == 0)


async def _until_error(call: grpc.aio.UnaryStreamCall) -> object:  # type: ignore[type-arg]
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            yield event
    except grpc.aio.AioRpcError:
        return


async def _wait_for(condition: object, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("fields", "violated"),
    [
        ({"image": b""}, {"image"}),
        ({"prompt": "   "}, {"prompt"}),
        ({"strength": 0.0}, {"strength"}),
        (
            {"strength": 1.5, "num_inference_steps": 0, "guidance_scale": 31.0},
            {"strength", "num_inference_steps", "guidance_scale"},
        ),
        ({"scheduler": img2img.SCHEDULER_UNSPECIFIED}, {"scheduler"}),
        ({"output_format": 99}, {"output_format"}),
        ({"delivery": 42}, {"delivery"}),
        ({"image": b"not an image at all"}, {"image"}),
        ({"image": png_bytes()[:40]}, {"image"}),
    ],
)
async def test_invalid_argument_has_field_violations(
    start_server: StartServer, fields: dict[str, object], violated: set[str]
) -> None:
    server, channel = await start_server()
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(img2img_request(**fields))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(call)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    bad_request = unpack(status, error_details_pb2.BadRequest)
    assert bad_request is not None
    assert {v.field for v in bad_request.field_violations} == violated  # type: ignore[attr-defined]
    assert all(v.description for v in bad_request.field_violations)  # type: ignore[attr-defined]
    info = unpack(status, error_details_pb2.ErrorInfo)
    assert info is not None and info.reason == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    assert server.runtime.admission.running == server.runtime.admission.queued == 0


async def test_pixel_limit_rejects_decompression_bomb(start_server: StartServer) -> None:
    _, channel = await start_server(runtime={}, server={})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    bomb = png_bytes(size=(5000, 5000), mode="L", color=0)  # 25 Mpx, a few KB
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(stub.Generate(img2img_request(image=bomb)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pixels" in (raised.value.details() or "")


async def test_overflow_gets_resource_exhausted_with_retry_info(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 4, "step_delay_s": 0.1}, runtime={"max_queue": 1})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    calls = [stub.Generate(img2img_request()) for _ in range(3)]
    outcomes = await asyncio.gather(*(collect(c) for c in calls), return_exceptions=True)

    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    results = [o for o in outcomes if isinstance(o, list)]
    assert len(results) == 2 and all(kinds(r)[-1] == "result" for r in results)
    (error,) = errors
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    retry = unpack(status, error_details_pb2.RetryInfo)
    assert retry is not None and retry.retry_delay.ToNanoseconds() > 0  # type: ignore[attr-defined]
    info = unpack(status, error_details_pb2.ErrorInfo)
    assert info is not None and info.reason == "CAPACITY"  # type: ignore[attr-defined]
    await _wait_for(lambda: server.runtime.admission.running == 0)
    server.runtime.admission.check_at_rest()


async def test_cancel_while_running_frees_slot_and_stores_nothing(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 50, "step_delay_s": 0.05}, storage={"local_path_uris": True})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(img2img_request(on_disconnect=job_pb2.DISCONNECT_POLICY_CANCEL))
    job_id = (await call.read()).accepted.job_id
    assert (await call.read()).WhichOneof("event") == "progress"
    call.cancel()
    await _wait_for(lambda: server.runtime.admission.running == 0, within=2.0)
    # The next job runs at once: the slot is really free.
    events = await collect(stub.Generate(img2img_request()))
    assert events[0].accepted.queue_position == 0 and kinds(events)[-1] == "result"
    output_dir = Path(events[-1].result.artifacts[0].uri.removeprefix("file://")).parent.parent
    assert not (output_dir / job_id).exists()
    server.runtime.admission.check_at_rest()


async def test_cancel_while_queued_leaves_the_queue(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 5, "step_delay_s": 0.05}, runtime={"max_queue": 1})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    running = stub.Generate(img2img_request())
    await running.read()
    waiting = stub.Generate(img2img_request(on_disconnect=job_pb2.DISCONNECT_POLICY_CANCEL))
    assert (await waiting.read()).accepted.queue_position == 1
    waiting.cancel()
    await _wait_for(lambda: server.runtime.admission.queued == 0)
    # Its place is free again: a new request is queued instead of rejected.
    third = stub.Generate(img2img_request())
    assert (await third.read()).accepted.queue_position == 1
    await collect(running)
    assert kinds(await collect(third))[-1] == "result"


async def test_get_info_answers_while_a_job_runs(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 20, "step_delay_s": 0.05})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(img2img_request())
    await call.read()
    await call.read()  # running now
    info = await stub.GetInfo(img2img.GetInfoRequest(), timeout=1.0)
    assert info.limits.running == 1 and info.limits.max_concurrency == 1
    assert info.model.readiness == 2  # READY
    assert info.parameters.num_inference_steps.max == 150
    assert img2img.SCHEDULER_DPMPP_2M in info.parameters.schedulers
    call.cancel()


@pytest.mark.parametrize(
    ("delivery", "expect_inline", "expect_chunks"),
    [
        (artifact_pb2.ARTIFACT_DELIVERY_UNSPECIFIED, False, False),
        (artifact_pb2.ARTIFACT_DELIVERY_INLINE, False, True),
        (artifact_pb2.ARTIFACT_DELIVERY_CHUNKED, False, True),
        (artifact_pb2.ARTIFACT_DELIVERY_REFERENCE, False, False),
    ],
)
async def test_large_artifact_delivery_respects_message_cap(
    start_server: StartServer, delivery: int, expect_inline: bool, expect_chunks: bool
) -> None:
    cap = 1 << 20
    _, channel = await start_server(
        "mesh", fake={"output_bytes": 3 * cap}, server={"max_message_bytes": cap}, storage={"local_path_uris": True}
    )
    stub = mesh_grpc.MeshProviderStub(channel)
    request = mesh.GenerateRequest(image=png_bytes(), output_format=mesh.MESH_FORMAT_GLB, delivery=delivery)  # type: ignore[arg-type]
    events = [e async for e in stub.Generate(request)]
    assert all(e.ByteSize() <= cap for e in events)
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    (artifact,) = events[-1].result.artifacts
    assert artifact.size_bytes > 2 * cap
    assert bool(artifact.inline_data) is expect_inline
    assert bool(chunks) is expect_chunks
    assert artifact.chunk_count == len(chunks)
    stored = Path(artifact.uri.removeprefix("file://")).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == artifact.sha256
    if chunks:
        assert [c.offset for c in chunks] == sorted(c.offset for c in chunks)
        assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
        joined = b"".join(c.data for c in chunks)
        assert hashlib.sha256(joined).hexdigest() == artifact.sha256


async def test_mesh_stream_and_glb_result(start_server: StartServer) -> None:
    _, channel = await start_server("mesh", fake={"steps": 3})
    stub = mesh_grpc.MeshProviderStub(channel)
    request = mesh.GenerateRequest(image=png_bytes(), output_format=mesh.MESH_FORMAT_GLB, mc_resolution=64)
    events = [e async for e in stub.Generate(request)]
    assert kinds(events)[0] == "accepted" and kinds(events)[-1] == "result"  # type: ignore[arg-type]
    stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    assert stages[:3] == [6, 6, 6] and stages[-1] == 7  # EXTRACT x3, then EXPORT
    result = events[-1].result
    assert result.vertex_count > 0 and result.face_count > 0
    assert result.parameters.mc_resolution == 64 and result.parameters.foreground_ratio == pytest.approx(0.85)
    assert result.artifacts[0].inline_data[:4] == b"glTF"
    assert result.artifacts[0].media_type == "model/gltf-binary"


async def test_mesh_invalid_arguments(start_server: StartServer) -> None:
    _, channel = await start_server("mesh")
    stub = mesh_grpc.MeshProviderStub(channel)
    request = mesh.GenerateRequest(
        image=png_bytes(), mc_resolution=16, foreground_ratio=0.2, mc_threshold=0.0, texture_resolution=100
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [e async for e in stub.Generate(request)]
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    bad_request = unpack(status, error_details_pb2.BadRequest)
    fields = {v.field for v in bad_request.field_violations}  # type: ignore[union-attr]
    assert fields == {"mc_resolution", "foreground_ratio", "mc_threshold", "texture_resolution", "output_format"}


async def test_unexpected_exception_is_internal_with_request_id_only(start_server: StartServer) -> None:
    server, channel = await start_server()

    def explode(*_: object) -> object:
        raise RuntimeError("secret internals: /opt/model/weights.bin")

    server.runtime.manager.provider.run = explode  # type: ignore[method-assign]
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(img2img_request(), metadata=(("x-request-id", "req-123"),))
    events = [e async for e in _until_error(call)]
    assert kinds(events)[-1] == "error"
    assert await call.code() == grpc.StatusCode.INTERNAL
    details = await call.details()
    assert "req-123" in details and "secret" not in details
    assert "secret" not in events[-1].error.message
    trailing = dict(await call.trailing_metadata())  # type: ignore[arg-type]
    assert trailing.get("x-request-id") == "req-123"
    await _wait_for(lambda: server.runtime.admission.running == 0)


async def test_metrics_count_requests_by_code(start_server: StartServer) -> None:
    server, channel = await start_server()
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    await collect(stub.Generate(img2img_request()))
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub.Generate(img2img_request(prompt="")))
    registry = server.runtime.metrics.registry
    ok = registry.get_sample_value("kiln_requests_total", {"service": "img2img", "method": "Generate", "code": "OK"})
    bad = registry.get_sample_value(
        "kiln_requests_total", {"service": "img2img", "method": "Generate", "code": "INVALID_ARGUMENT"}
    )
    assert ok == 1 and bad == 1
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(None, _fetch, f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert 'code="INVALID_ARGUMENT"' in body


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()

"""The Stable Fast 3D provider behind the real mesh server: the vendor's GLB is the artifact, refusals are events."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as pb_grpc
from tests.servers import StartServer
from tests.standins.stable_fast_3d import StableFast3DStandIn, sphere_glb
from tests.support import png_bytes

KEY = "sk-test-key-0123456789"


@pytest.fixture
def sf3d() -> Iterator[StableFast3DStandIn]:
    with StableFast3DStandIn(api_key=KEY) as server:
        yield server


async def start(start_server: StartServer, sf3d: StableFast3DStandIn) -> pb_grpc.MeshProviderStub:
    _, channel = await start_server(
        "mesh", provider="stable_fast_3d", stable_fast_3d={"api_key": KEY, "base_url": sf3d.base_url}
    )
    return pb_grpc.MeshProviderStub(channel)


async def run(
    stub: pb_grpc.MeshProviderStub, output_format: int = pb.MESH_FORMAT_GLB
) -> tuple[list[pb.GenerateResponse], grpc.aio.AioRpcError | None]:
    call = stub.Generate(pb.GenerateRequest(image=png_bytes(), output_format=output_format))  # type: ignore[arg-type]
    events: list[Any] = []
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


def error_info(status: Any) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    return info


async def test_success_delivers_the_vendor_glb(start_server: StartServer, sf3d: StableFast3DStandIn) -> None:
    stub = await start(start_server, sf3d)
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.model.provider == "stable_fast_3d" and info.model.device == "vendor"

    events, error = await run(stub)

    assert error is None
    stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    assert stages == [9, 10, 11, 7]  # VENDOR_SUBMITTED, VENDOR_WAITING, VENDOR_RECEIVED, EXPORT
    result = events[-1].result
    [artifact] = result.artifacts
    assert artifact.media_type == "model/gltf-binary"
    assert artifact.sha256 == hashlib.sha256(sphere_glb()).hexdigest()
    assert artifact.inline_data == sphere_glb()
    assert (result.vertex_count, result.face_count) == (114, 224)
    assert result.provenance.reproducibility == 3  # NONE
    [sent] = sf3d.requests
    assert sent.headers["authorization"] == f"Bearer {KEY}" and sent.image_content_type == "image/png"


async def test_moderation_is_an_in_band_content_blocked_error(
    start_server: StartServer, sf3d: StableFast3DStandIn
) -> None:
    sf3d.scenario = "content_moderation"
    events, error = await run(await start(start_server, sf3d))

    assert events[0].WhichOneof("event") == "accepted"
    assert events[-1].WhichOneof("event") == "error"
    status = events[-1].error
    assert status.code == code_pb2.FAILED_PRECONDITION
    info = error_info(status)
    assert info.reason == "CONTENT_BLOCKED_INPUT"
    assert info.metadata["vendor"] == "stability" and info.metadata["vendor_reason"] == "content_moderation"
    assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert KEY not in status.message


async def test_obj_is_refused_without_calling_the_vendor(start_server: StartServer, sf3d: StableFast3DStandIn) -> None:
    events, error = await run(await start(start_server, sf3d), pb.MESH_FORMAT_OBJ)

    status = events[-1].error
    assert status.code == code_pb2.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(bad_request.DESCRIPTOR)).Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["output_format"]
    assert error is not None and sf3d.requests == []

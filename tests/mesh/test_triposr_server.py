"""The mesh server with the tiny TripoSR checkpoint and rembg on the tiny u2net: stream, formats, frames."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import grpc
import numpy as np
import pytest
import trimesh
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image, ImageDraw

from kiln.common.v1 import job_pb2
from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as pb_grpc
from kiln_mesh.mesh import NATIVE_TO_Y_UP
from kiln_mesh.testing.assets import TinyMeshModels
from kiln_runtime.provider import RunContext
from tests.servers import StartServer

STAGES = {2: "DENOISE", 4: "REMOVE_BACKGROUND", 5: "ENCODE", 6: "EXTRACT", 7: "EXPORT"}


def object_png(size: int = 96, *, alpha: bool = False) -> bytes:
    """A bright disc on a dark background (or on transparency)."""
    mode, background = ("RGBA", (0, 0, 0, 0)) if alpha else ("RGB", (10, 10, 10))
    image = Image.new(mode, (size, size), background)
    ImageDraw.Draw(image).ellipse((20, 16, size - 20, size - 12), fill=(230, 120, 40, 255) if alpha else (230, 120, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request(**fields: Any) -> pb.GenerateRequest:
    base: dict[str, Any] = {"image": object_png(), "output_format": pb.MESH_FORMAT_GLB, "mc_resolution": 48}
    base.update(fields)
    return pb.GenerateRequest(**base)


async def events_of(call: Any) -> list[pb.GenerateResponse]:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def mesh_server(
    start_server: StartServer, tiny: TinyMeshModels, **options: Any
) -> tuple[Any, pb_grpc.MeshProviderStub]:
    triposr = {"rembg_model_path": tiny.u2net_path, **options.pop("triposr", {})}
    server, channel = await start_server(
        "mesh", provider="local", model={"id": str(tiny.triposr_dir)}, triposr=triposr, **options
    )
    return server, pb_grpc.MeshProviderStub(channel)


def load(data: bytes, file_type: str) -> trimesh.Trimesh:
    return trimesh.load(io.BytesIO(data), file_type=file_type, force="mesh", process=False)


async def test_full_stream_by_stage(start_server: StartServer, tiny_mesh: TinyMeshModels) -> None:
    _, stub = await mesh_server(start_server, tiny_mesh, triposr={"chunk_size": 4096})
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.model.readiness == 2 and info.model.provider == "local", info.model.readiness_reason
    assert len(info.model.model_revision) == 64  # the checkpoint's SHA-256
    events = await events_of(stub.Generate(request()))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    stages = [STAGES[p.stage] for p in progress]
    assert stages[0] == "REMOVE_BACKGROUND" and stages[1] == "ENCODE" and stages[-1] == "EXPORT"
    extract = [p for p in progress if p.stage == 6]
    total = extract[0].total_steps
    assert total > 10  # 48^3 points in chunks of 4096, plus the meshing step
    steps = [p.step for p in extract]
    # One report per chunk, then the meshing steps (marching cubes, merge, colours) at total-1, then total.
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(1, total + 1))
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions)
    result = events[-1].result
    assert result.parameters.background_removed is True
    assert result.vertex_count > 100 and result.face_count > 100
    assert [t.phase for t in result.timings][:5] == ["preprocess", "queue", "remove_background", "encode", "extract"]
    glb = load(result.artifacts[0].inline_data, "glb")
    assert len(glb.vertices) == result.vertex_count and len(glb.faces) == result.face_count
    colors = np.asarray(glb.visual.vertex_colors)[:, :3]
    assert colors.std() > 0  # real colours from the triplane, not a constant


async def test_formats_keep_colours_and_frame(start_server: StartServer, tiny_mesh: TinyMeshModels) -> None:
    _, stub = await mesh_server(start_server, tiny_mesh)
    meshes = {}
    for name, fmt, frame in [
        ("glb", pb.MESH_FORMAT_GLB, pb.MESH_FRAME_Y_UP),
        ("obj", pb.MESH_FORMAT_OBJ, pb.MESH_FRAME_Y_UP),
        ("ply", pb.MESH_FORMAT_PLY, pb.MESH_FRAME_Y_UP),
        ("native", pb.MESH_FORMAT_PLY, pb.MESH_FRAME_NATIVE),
    ]:
        result = (await events_of(stub.Generate(request(output_format=fmt, frame=frame))))[-1].result
        file_type = "ply" if name == "native" else name
        meshes[name] = load(result.artifacts[0].inline_data, file_type)
    reference = meshes["glb"]
    for name in ("obj", "ply"):
        np.testing.assert_allclose(meshes[name].vertices, reference.vertices, atol=1e-6)
        ours = np.asarray(meshes[name].visual.vertex_colors)[:, :3].astype(int)
        np.testing.assert_allclose(ours, np.asarray(reference.visual.vertex_colors)[:, :3], atol=1)
    # The Y-up file is the native one rotated by the documented matrix.
    np.testing.assert_allclose(meshes["native"].vertices @ NATIVE_TO_Y_UP.T, reference.vertices, atol=1e-5)


async def test_same_input_same_bytes(start_server: StartServer, tiny_mesh: TinyMeshModels) -> None:
    _, stub = await mesh_server(start_server, tiny_mesh)
    first = (await events_of(stub.Generate(request())))[-1].result.artifacts[0].sha256
    second = (await events_of(stub.Generate(request())))[-1].result.artifacts[0].sha256
    assert first == second


async def test_real_alpha_skips_background_removal(start_server: StartServer, tiny_mesh: TinyMeshModels) -> None:
    _, stub = await mesh_server(start_server, tiny_mesh)
    auto = (await events_of(stub.Generate(request(image=object_png(alpha=True)))))[-1].result
    assert auto.parameters.background_removed is False
    forced = pb.REMOVE_BACKGROUND_ALWAYS
    always = await events_of(stub.Generate(request(image=object_png(alpha=True), remove_background=forced)))
    assert always[-1].result.parameters.background_removed is True


async def test_baked_texture_glb(start_server: StartServer, tiny_mesh: TinyMeshModels) -> None:
    _, stub = await mesh_server(start_server, tiny_mesh)
    result = (await events_of(stub.Generate(request(bake_texture=True, texture_resolution=256))))[-1].result
    assert result.parameters.bake_texture is True and result.parameters.texture_resolution == 256
    glb = load(result.artifacts[0].inline_data, "glb")
    texture = glb.visual.material.baseColorTexture
    assert texture.size == (256, 256)
    assert glb.visual.uv.shape == (len(glb.vertices), 2)


async def test_cancel_between_chunks_frees_the_slot(
    start_server: StartServer, tiny_mesh: TinyMeshModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[int] = []
    original = RunContext.report

    def counting(self: RunContext, update: Any) -> None:
        original(self, update)
        reports.append(update.step)

    monkeypatch.setattr(RunContext, "report", counting)
    server, stub = await mesh_server(start_server, tiny_mesh, triposr={"chunk_size": 512})
    # 96^3 / 512 = 1728 chunks
    call = stub.Generate(request(mc_resolution=96, on_disconnect=job_pb2.DISCONNECT_POLICY_CANCEL))
    job_id = (await call.read()).accepted.job_id
    while (event := await call.read()).WhichOneof("event") != "progress" or event.progress.stage != 6:
        pass
    call.cancel()
    for _ in range(500):
        if server.runtime.admission.running == 0:
            break
        await asyncio.sleep(0.01)
    assert server.runtime.admission.running == 0
    assert len(reports) < 200, f"{len(reports)} progress reports after a cancel during extraction"
    job = server.runtime.jobs.get(job_id)
    assert job is not None
    await job.wait_finished()  # the cancelled job's folder (its record) is removed before it ends
    assert not (server.runtime.store.root / job_id).exists()
    assert (await events_of(stub.Generate(request())))[-1].WhichOneof("event") == "result"


async def test_no_surface_is_a_field_violation(start_server: StartServer, tiny_mesh: TinyMeshModels) -> None:
    _, stub = await mesh_server(start_server, tiny_mesh)
    call = stub.Generate(request(mc_threshold=1000.0))  # the top of the accepted range; far above the tiny field
    events: list[Any] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(_collect_into(call, events), timeout=120)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert events[-1].WhichOneof("event") == "error"
    bad = error_details_pb2.BadRequest()
    status = rpc_status.from_call(raised.value)
    next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert bad.field_violations[0].field == "mc_threshold"


async def _collect_into(call: Any, events: list[Any]) -> None:
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)


async def test_checkpoint_with_a_missing_key_is_not_served(
    start_server: StartServer, tiny_mesh: TinyMeshModels, tmp_path: Any
) -> None:
    import shutil

    import torch

    broken = tmp_path / "broken"
    shutil.copytree(tiny_mesh.triposr_dir, broken)
    state = torch.load(broken / "model.ckpt", weights_only=True)
    state.pop("decoder.layers.0.bias")
    torch.save(state, broken / "model.ckpt")
    _, channel = await start_server(
        "mesh", provider="local", model={"id": str(broken)}, triposr={"rembg_model_path": tiny_mesh.u2net_path}
    )
    info = await pb_grpc.MeshProviderStub(channel).GetInfo(pb.GetInfoRequest())
    assert info.model.readiness == 3
    assert "decoder.layers.0.bias" in info.model.readiness_reason


async def test_offline_missing_hub_model_reports_what_to_set(
    start_server: StartServer, tiny_mesh: TinyMeshModels, tmp_path: Any
) -> None:
    _, channel = await start_server(
        "mesh",
        provider="local",
        model={"id": "stabilityai/TripoSR", "cache_dir": tmp_path / "empty-cache"},
        triposr={"rembg_model_path": tiny_mesh.u2net_path},
    )
    info = await pb_grpc.MeshProviderStub(channel).GetInfo(pb.GetInfoRequest())
    assert info.model.readiness == 3
    assert "offline" in info.model.readiness_reason and "KILN_MESH__MODEL__ID" in info.model.readiness_reason
    assert info.parameters.can_bake_texture is True


async def test_grpcurl_generate_on_a_server_process(tiny_mesh: TinyMeshModels, tmp_path: Any) -> None:
    import base64
    import json
    import os
    import sys

    from tests.grpc.test_grpcurl import json_stream
    from tests.tools import grpcurl_executable

    grpcurl = grpcurl_executable()  # before the server starts: skip early when there is none

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KILN_OFFLINE": "1",
        "KILN_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "KILN_MESH__SERVER__PORT": "0",
        "KILN_MESH__SERVER__METRICS_ENABLED": "false",
        "KILN_MESH__MODEL__ID": str(tiny_mesh.triposr_dir),
        "KILN_MESH__TRIPOSR__REMBG_MODEL_PATH": str(tiny_mesh.u2net_path),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kiln_mesh", env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(120):
            while True:
                line = await process.stderr.readline()
                assert line, "server exited"
                if line.startswith(b"{") and "serving on" in (message := json.loads(line)["message"]):
                    port = int(message.split(":")[1].split()[0])
                    break
        asyncio.get_running_loop().create_task(_drain(process.stderr))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.MeshProviderStub(channel)
            while (await stub.GetInfo(pb.GetInfoRequest())).model.readiness != 2:
                await asyncio.sleep(0.1)
        body = {
            "image": base64.b64encode(object_png()).decode(),
            "output_format": "MESH_FORMAT_OBJ",
            "mc_resolution": 32,
        }
        run = await asyncio.create_subprocess_exec(
            grpcurl,
            "-plaintext",
            "-d",
            json.dumps(body),
            f"127.0.0.1:{port}",
            "kiln.mesh.v1.MeshProvider/Generate",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(run.communicate(), timeout=120)
        assert run.returncode == 0, stderr.decode()
        events = json_stream(stdout.decode())
        stages = [e["progress"]["stage"] for e in events if "progress" in e]
        assert stages[0] == "STAGE_REMOVE_BACKGROUND" and "STAGE_EXTRACT" in stages
        result = events[-1]["result"]
        obj = base64.b64decode(result["artifacts"][0]["inline_data"]).decode()
        assert obj.count("\nv ") == int(result["vertex_count"])
    finally:
        process.terminate()
        await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass

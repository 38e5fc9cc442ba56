"""Keep-alive with the tiny TripoSR and rembg's tiny u2net on a real server: both are dropped when
idle and loaded again in the job's stream, before its first mesh stage."""

from __future__ import annotations

import asyncio
from typing import Any

from kiln.common.v1 import job_pb2
from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln_mesh.testing.assets import TinyMeshModels
from kiln_runtime.model_manager import ModelState
from kiln_runtime.server import KilnServer
from tests.mesh.test_triposr_server import events_of, mesh_server, request
from tests.servers import StartServer


async def wait_unloaded(server: KilnServer) -> None:
    async with asyncio.timeout(30):
        while server.runtime.manager.state is not ModelState.UNLOADED:
            await asyncio.sleep(0.05)


async def test_idle_unload_and_reload_in_the_stream(start_server: StartServer, tiny_mesh: TinyMeshModels) -> None:
    server, stub = await mesh_server(start_server, tiny_mesh, runtime={"keep_alive": 0})
    await wait_unloaded(server)
    provider: Any = server.runtime.manager.provider
    assert provider._model is None and not provider._remover.loaded  # TripoSR and the rembg session
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert not info.model.loaded and info.model.readiness == 2 and info.model.keep_alive.ToSeconds() == 0

    results = []
    for _ in range(2):
        events = await events_of(stub.Generate(request()))
        assert events[-1].WhichOneof("event") == "result"
        stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
        assert stages[0] == job_pb2.STAGE_LOAD_MODEL
        first_mesh_stage = stages.index(job_pb2.STAGE_REMOVE_BACKGROUND)
        assert set(stages[:first_mesh_stage]) == {job_pb2.STAGE_LOAD_MODEL}
        assert job_pb2.STAGE_LOAD_MODEL not in stages[first_mesh_stage:]
        load = events[[e.WhichOneof("event") for e in events].index("progress")].progress
        assert load.HasField("eta")  # from the startup load
        results.append(events[-1].result)
        await wait_unloaded(server)
        assert provider._model is None and not provider._remover.loaded
    # The same checkpoint loaded again in place: the same mesh.
    assert results[0].artifacts[0].sha256 == results[1].artifacts[0].sha256
    registry = server.runtime.metrics.registry
    assert registry.get_sample_value("kiln_model_loads_total", {"service": "mesh", "result": "ok"}) == 3
    assert registry.get_sample_value("kiln_model_unloads_total", {"service": "mesh"}) == 3

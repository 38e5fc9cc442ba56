"""`KILN_PROFILE=laptop` in a real server process on the tiny model: SERVING at once with nothing
loaded, one job at a time, the model loaded by the first job (shown as a stage), then kept for
the profile's keep-alive."""

from __future__ import annotations

from pathlib import Path

import grpc

from kiln.common.v1 import job_pb2, service_info_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.testing.tiny_models import TinyModels
from kiln_runtime.profiles import LAPTOP_KEEP_ALIVE_S
from tests.img2img.test_process_img2img import start
from tests.support import png_bytes


async def test_laptop_profile_loads_on_the_first_job(tiny: TinyModels, tmp_path: Path) -> None:
    process, port = await start(tmp_path, KILN_PROFILE="laptop", KILN_IMG2IMG__MODEL__ID=str(tiny.diffusers_dir))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.Img2ImgProviderStub(channel)
            before = await stub.GetInfo(pb.GetInfoRequest())
            assert before.model.readiness == service_info_pb2.READINESS_READY
            assert before.model.loaded is False
            assert before.model.keep_alive.ToTimedelta().total_seconds() == LAPTOP_KEEP_ALIVE_S
            assert before.limits.max_concurrency == 1

            request = pb.GenerateRequest(
                image=png_bytes((64, 64)),
                prompt="a lighthouse",
                seed=1,
                num_inference_steps=2,
                scheduler=pb.SCHEDULER_EULER,
                output_format=pb.IMAGE_FORMAT_PNG,
            )
            events = [event async for event in stub.Generate(request)]
            stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
            assert stages[0] == job_pb2.STAGE_LOAD_MODEL
            assert job_pb2.STAGE_DENOISE in stages
            assert events[-1].WhichOneof("event") == "result"

            after = await stub.GetInfo(pb.GetInfoRequest())
            assert after.model.loaded is True
            assert after.model.last_load_duration.ToTimedelta().total_seconds() > 0
    finally:
        process.terminate()
        await process.wait()

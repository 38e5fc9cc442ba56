"""The img2img server process with the tiny model: grpcurl via reflection, and SIGHUP reload."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path

import grpc

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.testing.tiny_models import TinyModels
from tests.grpc.test_grpcurl import json_stream
from tests.support import png_bytes
from tests.tools import grpcurl_executable


async def start(cwd: Path, **env: str) -> tuple[asyncio.subprocess.Process, int]:
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KILN_STORAGE__DATA_DIR": str(cwd / "data"),
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_ENABLED": "false",
        "KILN_OFFLINE": "1",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kiln_img2img", cwd=cwd, env=environment, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    async with asyncio.timeout(120):
        while True:
            line = await process.stderr.readline()
            assert line, f"server exited with {await process.wait()}"
            if not line.startswith(b"{"):
                continue
            message = json.loads(line)["message"]
            if "serving on" in message:
                port = int(message.split(":")[1].split()[0])
                break
    asyncio.get_running_loop().create_task(_drain(process.stderr))
    return process, port


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def wait_ready(stub: pb_grpc.Img2ImgProviderStub, model_id: str) -> pb.GetInfoResponse:
    async with asyncio.timeout(120):
        while True:
            info = await stub.GetInfo(pb.GetInfoRequest())
            if info.model.readiness == 2 and info.model.model_id == model_id:
                return info
            assert info.model.readiness != 3, info.model.readiness_reason
            await asyncio.sleep(0.1)


async def test_grpcurl_generate_with_the_tiny_model(tiny: TinyModels, tmp_path: Path) -> None:
    grpcurl = grpcurl_executable()  # before the server starts: skip early when there is none
    process, port = await start(tmp_path, KILN_IMG2IMG__MODEL__ID=str(tiny.diffusers_dir))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_ready(pb_grpc.Img2ImgProviderStub(channel), tiny.diffusers_dir.name)
        body = {
            "image": base64.b64encode(png_bytes((64, 64))).decode(),
            "prompt": "a lighthouse",
            "seed": 3,
            "num_inference_steps": 4,
            "scheduler": "SCHEDULER_DPMPP_2M",
            "output_format": "IMAGE_FORMAT_JPEG",
        }
        run = await asyncio.create_subprocess_exec(
            grpcurl,
            "-plaintext",
            "-d",
            json.dumps(body),
            f"127.0.0.1:{port}",
            "kiln.img2img.v1.Img2ImgProvider/Generate",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(run.communicate(), timeout=120)
        assert run.returncode == 0, stderr.decode()
        events = json_stream(stdout.decode())
        assert next(iter(events[0])) == "accepted"
        steps = [e["progress"]["step"] for e in events if "progress" in e and e["progress"]["stage"] == "STAGE_DENOISE"]
        assert steps == [1, 2, 3]  # int(4 x 0.75)
        result = events[-1]["result"]
        assert result["provenance"]["provider"] == "local"
        assert base64.b64decode(result["artifacts"][0]["inline_data"])[:3] == b"\xff\xd8\xff"  # JPEG
    finally:
        process.terminate()
        await process.wait()


async def test_sighup_reloads_a_new_model_without_dropping_a_stream(tiny: TinyModels, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"KILN_IMG2IMG__MODEL__ID={tiny.diffusers_dir}\n")
    process, port = await start(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.Img2ImgProviderStub(channel)
            await wait_ready(stub, tiny.diffusers_dir.name)
            request = pb.GenerateRequest(
                image=png_bytes((64, 64)),
                prompt="fox",
                seed=5,
                num_inference_steps=40,
                strength=1.0,
                scheduler=pb.SCHEDULER_EULER,
                output_format=pb.IMAGE_FORMAT_PNG,
            )
            call = stub.Generate(request)
            assert (await call.read()).WhichOneof("event") == "accepted"
            assert (await call.read()).WhichOneof("event") == "progress"

            (tmp_path / ".env").write_text(
                f"KILN_IMG2IMG__MODEL__ID={tiny.single_file}\nKILN_IMG2IMG__DIFFUSERS__CONFIG_DIR={tiny.config_dir}\n"
            )
            process.send_signal(signal.SIGHUP)
            events = []
            while (event := await call.read()) is not grpc.aio.EOF:
                events.append(event)
            assert events[-1].WhichOneof("event") == "result"
            assert events[-1].result.provenance.model_id == tiny.diffusers_dir.name  # finished on the old model

            info = await wait_ready(stub, tiny.single_file.name)
            assert len(info.model.model_revision) == 64  # the checkpoint's SHA-256
            after = stub.Generate(request)
            result = [e async for e in after][-1].result
            assert result.provenance.model_id == tiny.single_file.name  # a name, never the path
    finally:
        process.terminate()
        await process.wait()

"""The local SD1.5 provider on a real port with the tiny model: stream, determinism, sources, limits."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.preprocess import prepare_image
from kiln_img2img.testing.tiny_models import TinyModels
from kiln_runtime.provider import RunContext
from tests.servers import StartServer
from tests.support import png_bytes

SCHEDULERS = [
    "SCHEDULER_DPMPP_2M",
    "SCHEDULER_EULER",
    "SCHEDULER_EULER_ANCESTRAL",
    "SCHEDULER_DDIM",
    "SCHEDULER_PNDM",
    "SCHEDULER_LMS",
]


def request(**fields: Any) -> pb.GenerateRequest:
    base: dict[str, Any] = {
        "image": png_bytes((96, 64), color=(180, 90, 40)),
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "seed": 1234,
        "strength": 0.75,
        "num_inference_steps": 4,
        "guidance_scale": 7.5,
        "scheduler": pb.SCHEDULER_EULER,
        "output_format": pb.IMAGE_FORMAT_PNG,
    }
    base.update(fields)
    return pb.GenerateRequest(**base)


async def events_of(call: Any) -> list[pb.GenerateResponse]:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def local_server(
    start_server: StartServer, model_id: str, **options: Any
) -> tuple[Any, pb_grpc.Img2ImgProviderStub]:
    server, channel = await start_server(provider="local", model={"id": model_id}, **options)
    return server, pb_grpc.Img2ImgProviderStub(channel)


async def test_full_stream_with_previews(start_server: StartServer, tiny: TinyModels) -> None:
    _, stub = await local_server(start_server, str(tiny.diffusers_dir))
    events = await events_of(stub.Generate(request(num_inference_steps=8, preview_every_n_steps=2)))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    denoise = [e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.stage == 2]
    total = denoise[0].total_steps
    assert [p.step for p in denoise] == list(range(1, total + 1))
    assert total == 6  # int(8 x 0.75) Euler steps
    assert [bool(p.preview.data) for p in denoise] == [s % 2 == 0 for s in range(1, total + 1)]
    preview = Image.open(io.BytesIO(denoise[1].preview.data))
    assert preview.format == "WEBP" and max(preview.size) <= 128
    assert any(e.progress.stage == 3 for e in events if e.WhichOneof("event") == "progress")  # DECODE
    result = events[-1].result
    assert (result.width, result.height) == (96, 64)
    assert result.parameters.steps_run == total
    assert result.provenance.provider == "local" and result.provenance.dtype == "float32"
    assert result.provenance.library_versions["diffusers"]
    phases = [t.phase for t in result.timings]
    assert {"preprocess", "queue", "denoise", "decode", "encode", "store"} <= set(phases)
    image = Image.open(io.BytesIO(result.artifacts[0].inline_data))
    assert image.size == (96, 64) and image.mode == "RGB"


def direct_diffusers_png(tiny: TinyModels, seed: int) -> bytes:
    """The same job through diffusers directly, as a user would write it."""
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(tiny.diffusers_dir),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    image = prepare_image(Image.open(io.BytesIO(png_bytes((96, 64), color=(180, 90, 40))))).image
    with torch.inference_mode():
        out = pipe(
            prompt="a red fox",
            negative_prompt="blurry",
            image=image,
            strength=0.75,
            num_inference_steps=4,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_same_seed_same_bytes_and_equal_to_direct_diffusers(start_server: StartServer, tiny: TinyModels) -> None:
    _, stub = await local_server(start_server, str(tiny.diffusers_dir))
    first = (await events_of(stub.Generate(request())))[-1].result.artifacts[0]
    second = (await events_of(stub.Generate(request())))[-1].result.artifacts[0]
    other = (await events_of(stub.Generate(request(seed=99))))[-1].result.artifacts[0]
    assert first.sha256 == second.sha256 != other.sha256
    direct = await asyncio.to_thread(direct_diffusers_png, tiny, 1234)
    assert hashlib.sha256(direct).hexdigest() == first.sha256


@pytest.mark.parametrize("scheduler", SCHEDULERS)
async def test_each_scheduler_runs(start_server: StartServer, tiny: TinyModels, scheduler: str) -> None:
    _, stub = await local_server(start_server, str(tiny.diffusers_dir))
    events = await events_of(stub.Generate(request(scheduler=scheduler, num_inference_steps=3, strength=1.0)))
    result = events[-1].result
    assert result.parameters.scheduler == pb.Scheduler.Value(scheduler)
    assert result.parameters.steps_run >= 3
    assert Image.open(io.BytesIO(result.artifacts[0].inline_data)).size == (96, 64)


async def test_all_three_model_sources_load_and_agree(start_server: StartServer, tiny: TinyModels) -> None:
    sources = {
        "folder": ({"id": str(tiny.diffusers_dir)}, {}),
        "single_file": ({"id": str(tiny.single_file)}, {"config_dir": tiny.config_dir}),
        "hub": ({"id": tiny.repo_id, "revision": tiny.revision, "cache_dir": tiny.hub_cache}, {}),
    }
    hashes, revisions = {}, {}
    for name, (model, diffusers) in sources.items():
        _, channel = await start_server(provider="local", model=model, diffusers=diffusers)
        stub = pb_grpc.Img2ImgProviderStub(channel)
        info = await stub.GetInfo(pb.GetInfoRequest())
        assert info.model.readiness == 2, (name, info.model.readiness_reason)  # READY
        result = (await events_of(stub.Generate(request())))[-1].result
        hashes[name] = result.artifacts[0].sha256
        revisions[name] = result.provenance.model_revision
    assert len(set(hashes.values())) == 1, hashes
    assert revisions["hub"] == tiny.revision
    assert revisions["single_file"] == hashlib.sha256(tiny.single_file.read_bytes()).hexdigest()


async def test_offline_missing_model_reports_what_to_set(start_server: StartServer, tmp_path: Path) -> None:
    model = {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "cache_dir": tmp_path / "empty-cache"}
    _, channel = await start_server(provider="local", model=model)
    info = await pb_grpc.Img2ImgProviderStub(channel).GetInfo(pb.GetInfoRequest())
    assert info.model.readiness == 3  # FAILED
    reason = info.model.readiness_reason
    assert "offline" in reason and "KILN_IMG2IMG__MODEL__ID" in reason
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await events_of(pb_grpc.Img2ImgProviderStub(channel).Generate(request()))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_single_file_without_config_dir_is_a_clear_failure(start_server: StartServer, tiny: TinyModels) -> None:
    _, channel = await start_server(provider="local", model={"id": str(tiny.single_file)})
    info = await pb_grpc.Img2ImgProviderStub(channel).GetInfo(pb.GetInfoRequest())
    assert info.model.readiness == 3
    assert "KILN_IMG2IMG__DIFFUSERS__CONFIG_DIR" in info.model.readiness_reason


async def test_cancel_stops_within_a_step_and_frees_the_slot(
    start_server: StartServer, tiny: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps_reported: list[int] = []
    original = RunContext.report

    def counting(self: RunContext, update: Any) -> None:
        original(self, update)
        steps_reported.append(update.step)

    monkeypatch.setattr(RunContext, "report", counting)
    server, stub = await local_server(start_server, str(tiny.diffusers_dir))
    call = stub.Generate(request(num_inference_steps=60, strength=1.0, on_disconnect=job_pb2.DISCONNECT_POLICY_CANCEL))
    job_id = (await call.read()).accepted.job_id
    while (await call.read()).WhichOneof("event") != "progress":
        pass
    call.cancel()
    for _ in range(500):
        if server.runtime.admission.running == 0:
            break
        await asyncio.sleep(0.01)
    assert server.runtime.admission.running == 0
    seen = len(steps_reported)
    assert seen < 10, f"{seen} steps ran after a cancel at step 1 of 60"
    job = server.runtime.jobs.get(job_id)
    assert job is not None
    await job.wait_finished()  # the cancelled job's folder (its record) is removed before it ends
    assert not (server.runtime.store.root / job_id).exists()  # type: ignore[attr-defined]
    events = await events_of(stub.Generate(request()))
    assert events[-1].WhichOneof("event") == "result"


async def test_limit_one_queue_one_three_clients(start_server: StartServer, tiny: TinyModels) -> None:
    _, stub = await local_server(start_server, str(tiny.diffusers_dir), runtime={"max_queue": 1})
    calls = [stub.Generate(request(num_inference_steps=8, strength=1.0, seed=i)) for i in range(3)]
    outcomes = await asyncio.gather(*(events_of(c) for c in calls), return_exceptions=True)
    results = [o for o in outcomes if isinstance(o, list)]
    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(results) == 2 and all(r[-1].WhichOneof("event") == "result" for r in results)
    (error,) = errors
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry) == 1


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"strength": 0.1, "num_inference_steps": 5}, "strength", "step"),
        ({"image": png_bytes((40, 200))}, "image", "64"),
        ({"num_inference_steps": 151}, "num_inference_steps", "150"),
        ({"guidance_scale": -1.0}, "guidance_scale", "30"),
    ],
)
async def test_bad_inputs_name_their_field(
    start_server: StartServer, tiny: TinyModels, fields: dict[str, Any], field: str, needle: str
) -> None:
    _, stub = await local_server(start_server, str(tiny.diffusers_dir))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await events_of(stub.Generate(request(**fields)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    bad = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    violation = next(v for v in bad.field_violations if v.field == field)
    assert needle in violation.description


async def test_rgba_input_and_long_prompt(start_server: StartServer, tiny: TinyModels) -> None:
    _, stub = await local_server(start_server, str(tiny.diffusers_dir))
    rgba = png_bytes((100, 75), mode="RGBA", color=(10, 200, 30, 0))
    long_prompt = " ".join(["a very detailed oil painting of a fox"] * 30)
    result = (await events_of(stub.Generate(request(image=rgba, prompt=long_prompt))))[-1].result
    assert (result.width, result.height) == (96, 72)  # rounded down to multiples of 8
    assert result.parameters.prompt_truncated is True
    short = (await events_of(stub.Generate(request())))[-1].result
    assert short.parameters.prompt_truncated is False


async def test_two_concurrent_runs_match_sequential_runs(start_server: StartServer, tiny: TinyModels) -> None:
    # One pipeline shared by two threads silently corrupts both results; each run owns its scheduler.
    _, stub = await local_server(start_server, str(tiny.diffusers_dir), runtime={"max_concurrency": 2})
    sequential = [(await events_of(stub.Generate(request(seed=s, num_inference_steps=6))))[-1] for s in (1, 2)]
    together = await asyncio.gather(*(events_of(stub.Generate(request(seed=s, num_inference_steps=6))) for s in (1, 2)))
    assert all(events[0].accepted.queue_position == 0 for events in together)
    assert [e[-1].result.artifacts[0].sha256 for e in together] == [e.result.artifacts[0].sha256 for e in sequential]

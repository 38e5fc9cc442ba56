"""Dynamic batching of img2img jobs: equal outputs, per-job progress, cancellation and errors.

The provider tests run the tiny SD1.5-shaped model on the CPU in float32. A batched sample is
not bitwise equal to the same request run alone (batched matrix products sum in another
order: about 4e-6 on the [0, 1] float image), so the stated tolerance is one level of the
8-bit output per channel. Within one batch composition the output is exact, which is what
the cancellation test compares.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.config import BatchingSettings, DiffusersSettings
from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_img2img.providers.diffusers_local import DiffusersImg2ImgProvider
from kiln_img2img.server import create_server
from kiln_img2img.testing.tiny_models import TinyModels
from kiln_runtime.device import CPU
from kiln_runtime.errors import Cancelled
from kiln_runtime.provider import ProgressUpdate, RunContext, Stage
from kiln_runtime.server import KilnServer
from kiln_runtime.settings import ModelSettings
from tests.support import img2img_settings, png_bytes

# One 8-bit level per channel: the float difference (~4e-6) can flip a rounding, never more.
PIXEL_TOLERANCE = 1
SIZE = (96, 64)


def make_input(index: int, *, preview_every: int = 0) -> Img2ImgInput:
    colours = [(180, 90, 40), (20, 90, 140), (0, 200, 40)]
    return Img2ImgInput(
        image=Image.new("RGB", SIZE, colours[index % 3]),
        prompt=["a red fox", "a blue cat", "a green frog"][index % 3],
        negative_prompt=["blurry", "", "dark"][index % 3],
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=7.5,
        seed=1000 + index,
        scheduler="EULER_ANCESTRAL",  # draws noise in every step: per-sample generators matter
        preview_every_n_steps=preview_every,
    )


class Recorded:
    """A job's context that keeps what it was told; optionally cancels itself after a step."""

    def __init__(self, name: str, cancel_after_step: int | None = None) -> None:
        self.updates: list[ProgressUpdate] = []
        self.cancel_after_step = cancel_after_step
        self.ctx = RunContext(name, report=self._report)

    def _report(self, update: ProgressUpdate) -> None:
        self.updates.append(update)
        if update.stage is Stage.DENOISE and update.step == self.cancel_after_step:
            self.ctx.cancel()  # as the event loop does when the client leaves

    def denoise_steps(self) -> list[int]:
        return [u.step for u in self.updates if u.stage is Stage.DENOISE]


def pixels(output: Img2ImgOutput | BaseException) -> np.ndarray[Any, Any]:
    assert isinstance(output, Img2ImgOutput), output
    return np.asarray(output.image, dtype=np.int16)


@pytest.fixture(scope="module")
def provider(tiny: TinyModels) -> DiffusersImg2ImgProvider:
    loaded = DiffusersImg2ImgProvider(ModelSettings(id=str(tiny.diffusers_dir)), DiffusersSettings(), CPU, offline=True)
    loaded.load()
    return loaded


def test_batched_outputs_equal_unbatched_and_each_job_gets_its_own_progress(
    provider: DiffusersImg2ImgProvider,
) -> None:
    requests = [make_input(i, preview_every=i) for i in range(3)]  # previews: never, every step, every 2nd
    alone = [provider.run(request, Recorded(f"alone-{i}").ctx) for i, request in enumerate(requests)]
    jobs = [Recorded(f"job-{i}") for i in range(3)]
    batched = provider.run_batch(requests, [job.ctx for job in jobs])
    for single, together in zip(alone, batched, strict=True):
        difference = np.abs(pixels(single) - pixels(together))
        assert difference.max() <= PIXEL_TOLERANCE
        assert isinstance(together, Img2ImgOutput) and together.steps_run == single.steps_run == 3
    # Different seeds: the batch did not give everyone the same noise.
    assert not np.array_equal(pixels(batched[0]), pixels(batched[1]))
    for i, job in enumerate(jobs):
        assert job.denoise_steps() == [1, 2, 3]
        with_preview = [bool(u.preview) for u in job.updates if u.stage is Stage.DENOISE]
        assert with_preview == [bool(i) and step % i == 0 for step in (1, 2, 3)]
        assert job.updates[-1].stage is Stage.DECODE
        assert {"denoise", "decode"} <= {name for name, _ in job.ctx.timer.phases}


def test_cancelling_one_job_leaves_the_others_outputs_unchanged(provider: DiffusersImg2ImgProvider) -> None:
    requests = [make_input(i) for i in range(3)]
    reference = provider.run_batch(requests, [Recorded(f"ref-{i}").ctx for i in range(3)])
    jobs = [Recorded("a"), Recorded("b", cancel_after_step=1), Recorded("c")]
    outcomes = provider.run_batch(requests, [job.ctx for job in jobs])
    assert isinstance(outcomes[1], Cancelled)
    assert jobs[1].denoise_steps() == [1]  # nothing reported after the cancellation
    for i in (0, 2):
        assert np.array_equal(pixels(outcomes[i]), pixels(reference[i]))  # bitwise: same batch, same sums
        assert jobs[i].denoise_steps() == [1, 2, 3]


def test_cancelling_every_job_stops_the_batch_before_the_decode(provider: DiffusersImg2ImgProvider) -> None:
    jobs = [Recorded("a", cancel_after_step=1), Recorded("b", cancel_after_step=1)]
    outcomes = provider.run_batch([make_input(0), make_input(1)], [job.ctx for job in jobs])
    assert all(isinstance(outcome, Cancelled) for outcome in outcomes)
    assert all(job.denoise_steps() == [1] for job in jobs)
    assert all(Stage.DECODE not in {u.stage for u in job.updates} for job in jobs)


# -- through the gRPC server ----------------------------------------------------------------
# The servers load the model on the first request (load_on_startup false): the concurrent jobs
# all hold slots while that one load runs, so they reach the batcher together. A job that finds
# itself the only one admitted would not wait for batch mates (Batcher's `alone`).
LAZY = {"load_on_startup": False}

StartBatching = Callable[..., Awaitable[tuple[KilnServer, pb_grpc.Img2ImgProviderStub]]]


@pytest.fixture
async def start_batching(tmp_path: Path) -> AsyncIterator[StartBatching]:
    """Like `start_server`, with batching settings (`img2img_settings` does not take them)."""
    started: list[tuple[KilnServer, grpc.aio.Channel]] = []

    async def start(batching: BatchingSettings, **options: Any) -> tuple[KilnServer, pb_grpc.Img2ImgProviderStub]:
        settings = img2img_settings(tmp_path / f"img2img-{len(started)}", **options)
        settings.img2img.batching = batching
        server = create_server(settings)
        port = await server.start()
        await server.runtime.manager.wait_loaded()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return server, pb_grpc.Img2ImgProviderStub(channel)

    yield start
    for server, channel in started:
        await channel.close()
        await server.stop(grace=0)


def grpc_request(seed: int, prompt: str = "a red fox") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        image=png_bytes(SIZE, color=(180, 90, 40)),
        prompt=prompt,
        seed=seed,
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=7.5,
        scheduler=pb.SCHEDULER_EULER,
        output_format=pb.IMAGE_FORMAT_PNG,
    )


async def final_event(
    stub: pb_grpc.Img2ImgProviderStub, request: pb.GenerateRequest
) -> pb.GenerateResponse | grpc.StatusCode:
    try:
        events = [event async for event in stub.Generate(request)]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return events[-1]


def batch_histogram(server: KilnServer) -> tuple[float | None, float | None]:
    registry = server.runtime.metrics.registry
    labels = {"service": "img2img"}
    return registry.get_sample_value("kiln_batch_size_count", labels), registry.get_sample_value(
        "kiln_batch_size_sum", labels
    )


async def test_one_failing_job_does_not_fail_its_batch_mates(start_batching: StartBatching) -> None:
    server, stub = await start_batching(
        BatchingSettings(max_batch_size=4, max_batch_delay_ms=5000),  # only a full batch runs early
        runtime={"max_concurrency": 4, **LAZY},
        fake={
            "steps": 4,
            "step_delay_s": 0.02,
            "fail_at_step": 2,
            "fail_when_prompt_contains": "FAIL",
            "load_delay_s": 0.5,
        },
    )
    prompts = ["ok 0", "FAIL 1", "ok 2", "ok 3"]
    finals = await asyncio.gather(*(final_event(stub, grpc_request(i, p)) for i, p in enumerate(prompts)))
    assert finals[1] == grpc.StatusCode.INTERNAL  # PROVIDER_FAILED, for this job alone
    for i in (0, 2, 3):
        final = finals[i]
        assert isinstance(final, pb.GenerateResponse) and final.WhichOneof("event") == "result", final
    assert batch_histogram(server) == (1.0, 4.0)  # one call held all four jobs


async def test_cancelling_one_streamed_job_leaves_the_others_complete(start_batching: StartBatching) -> None:
    server, stub = await start_batching(
        BatchingSettings(max_batch_size=3, max_batch_delay_ms=5000),
        runtime={"max_concurrency": 3, **LAZY},
        fake={"steps": 8, "step_delay_s": 0.05, "load_delay_s": 0.5},
    )
    leaving = stub.Generate(grpc_request(7))

    async def leave_after_first_progress() -> None:
        async for event in leaving:
            if event.WhichOneof("event") == "progress" and event.progress.stage == job_pb2.STAGE_DENOISE:
                leaving.cancel()
                return

    finals = await asyncio.gather(
        final_event(stub, grpc_request(5)), final_event(stub, grpc_request(6)), leave_after_first_progress()
    )
    for final in finals[:2]:
        assert isinstance(final, pb.GenerateResponse) and final.WhichOneof("event") == "result", final
    assert batch_histogram(server) == (1.0, 3.0)
    await asyncio.wait_for(server.runtime.admission.wait_idle(), 30)  # every slot came back, the cancelled job's too
    assert server.runtime.admission.running == 0


async def test_tiny_model_batched_through_grpc_equals_alone(start_batching: StartBatching, tiny: TinyModels) -> None:
    server, stub = await start_batching(
        BatchingSettings(max_batch_size=2, max_batch_delay_ms=2000),
        provider="local",
        model={"id": str(tiny.diffusers_dir)},
        runtime={"max_concurrency": 2, **LAZY},
    )
    together = await asyncio.gather(final_event(stub, grpc_request(11)), final_event(stub, grpc_request(12)))
    alone = await final_event(stub, grpc_request(11))  # the only job: a batch of one at once, `run` itself
    images = []
    for final in (alone, *together):
        assert isinstance(final, pb.GenerateResponse) and final.WhichOneof("event") == "result", final
        data = final.result.artifacts[0].inline_data
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= PIXEL_TOLERANCE
    assert not np.array_equal(images[1], images[2])
    assert batch_histogram(server) == (2.0, 3.0)  # one of two, then a batch of one

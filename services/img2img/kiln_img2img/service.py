"""img2img orchestration: preprocess, admit, run the provider off the loop, encode, store."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Callable

from PIL import Image

from kiln_img2img.batcher import Batcher, img2img_batch_key
from kiln_img2img.config import BatchingSettings, DiffusersSettings, Img2ImgProviderSettings
from kiln_img2img.convert import Img2ImgJob, Img2ImgPayload
from kiln_img2img.preprocess import prepare_image
from kiln_img2img.providers.base import BatchingImg2ImgModel, Img2ImgInput, Img2ImgModel, Img2ImgOutput
from kiln_runtime.jobs import JobOutput, RunnerEvent
from kiln_runtime.provider import RunContext
from kiln_runtime.runtime import Runtime
from kiln_runtime.service import ModelService

log = logging.getLogger(__name__)

# Encoder settings per output format: (Pillow format, media type, extension, save options).
ENCODINGS: dict[str, tuple[str, str, str, dict[str, object]]] = {
    "PNG": ("PNG", "image/png", "png", {}),
    "JPEG": ("JPEG", "image/jpeg", "jpg", {"quality": 95}),
    "WEBP": ("WEBP", "image/webp", "webp", {"lossless": True}),
}


def encode_image(image: Image.Image, output_format: str) -> tuple[bytes, str, str]:
    """Encode to the requested format; returns (bytes, media type, file extension)."""
    pil_format, media_type, extension, options = ENCODINGS[output_format]
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue(), media_type, extension


class Img2ImgService(ModelService[Img2ImgModel]):
    """Validate → preprocess → run → postprocess for one img2img provider."""

    def __init__(self, runtime: Runtime, options: DiffusersSettings, batching: BatchingSettings | None = None) -> None:
        super().__init__(runtime)
        self.preprocess_options = options
        if batching is None:  # the server passes the section, which holds the batching settings
            section = runtime.settings
            batching = section.batching if isinstance(section, Img2ImgProviderSettings) else BatchingSettings()
        self.batcher: Batcher[Img2ImgInput, Img2ImgOutput] | None = None
        if batching.max_batch_size > 1:
            slots = runtime.admission.max_concurrency
            if slots < batching.max_batch_size:
                log.warning(
                    "max_batch_size %d is above runtime.max_concurrency %d: batches hold at most %d jobs",
                    batching.max_batch_size,
                    slots,
                    slots,
                )
            self.batcher = Batcher(
                key=img2img_batch_key,
                max_batch_size=batching.max_batch_size,
                max_batch_delay_s=batching.max_batch_delay_ms / 1000,
                on_batch=runtime.metrics.batch_size.observe,
                # Read from worker threads: a stale count only costs or saves one delay.
                alone=lambda: runtime.admission.running + runtime.admission.queued <= 1,
            )

    def _run_provider(self, provider: Img2ImgModel, inputs: Img2ImgInput, ctx: RunContext) -> Img2ImgOutput:
        """Alone, or in a batch when batching is on and the provider can batch (not Gemini)."""
        if self.batcher is None or not isinstance(provider, BatchingImg2ImgModel):
            return provider.run(inputs, ctx)
        return self.batcher.submit(inputs, ctx, provider.run_batch)

    async def generate(
        self, job: Img2ImgJob, *, time_remaining: Callable[[], float | None] = lambda: None
    ) -> AsyncIterator[RunnerEvent]:
        """Stream one job's events; errors before the first event are raised, not yielded."""
        await self.check_input(job.image_bytes)  # header only: a refusal for capacity decodes nothing
        options = self.preprocess_options
        prepared: list[Img2ImgInput] = []

        async def prepare() -> None:  # after admission (JobRunner.run)
            decoded = await self.decode_input(job.image_bytes)
            image = await asyncio.to_thread(
                prepare_image, decoded, max_side=options.max_side, min_side=options.min_side
            )
            prepared.append(
                Img2ImgInput(
                    image=image.image,
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt,
                    strength=job.strength,
                    num_inference_steps=job.num_inference_steps,
                    guidance_scale=job.guidance_scale,
                    seed=job.seed,
                    scheduler=job.scheduler,
                    preview_every_n_steps=job.preview_every_n_steps,
                )
            )

        def work(ctx: RunContext) -> JobOutput[Img2ImgPayload]:
            (inputs,) = prepared
            with self.lease_provider() as provider:
                output = self._run_provider(provider, inputs, ctx)
                description = provider.describe()
            with ctx.phase("encode"):
                data, media_type, extension = encode_image(output.image, job.output_format)
            artifact = self.store(
                ctx,
                f"image.{extension}",
                data,
                media_type=media_type,
                metadata={"seed": str(job.seed), "client_request_id": job.client_request_id},
            )
            payload = Img2ImgPayload(job=job, output=output, description=description)
            return JobOutput(payload=payload, artifacts=[artifact])

        async for event in self.runtime.runner.run(
            work, delivery=job.delivery, time_remaining=time_remaining, prepare=prepare
        ):
            yield event

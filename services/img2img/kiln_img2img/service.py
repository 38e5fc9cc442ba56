"""img2img orchestration: preprocess, admit, run the provider off the loop, encode, store."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable

from PIL import Image

from kiln_img2img.convert import Img2ImgJob, Img2ImgPayload
from kiln_img2img.providers.base import Img2ImgInput, Img2ImgModel
from kiln_runtime.images import decode_image
from kiln_runtime.jobs import JobEvent, JobOutput, ProducedArtifact
from kiln_runtime.provider import RunContext
from kiln_runtime.server import Runtime

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


def to_rgb(image: Image.Image) -> Image.Image:
    """Explicit RGB: alpha is composited on white (models read 4 channels as latents)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class Img2ImgService:
    """Validate → preprocess → run → postprocess for one img2img provider."""

    def __init__(self, runtime: Runtime, provider: Img2ImgModel) -> None:
        self.runtime = runtime
        self.provider = provider

    async def generate(
        self, job: Img2ImgJob, *, time_remaining: Callable[[], float | None] = lambda: None
    ) -> AsyncIterator[JobEvent]:
        """Stream one job's events; errors before the first event are raised, not yielded."""
        await self.runtime.manager.ensure_ready()
        started = time.perf_counter()
        limits = self.runtime.settings.limits
        decoded = await asyncio.to_thread(
            decode_image, job.image_bytes, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )
        inputs = Img2ImgInput(
            image=to_rgb(decoded),
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            strength=job.strength,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            seed=job.seed,
            scheduler=job.scheduler,
            preview_every_n_steps=job.preview_every_n_steps,
        )
        preprocess_s = time.perf_counter() - started

        def work(ctx: RunContext) -> JobOutput[Img2ImgPayload]:
            output = self.provider.run(inputs, ctx)
            with ctx.phase("encode"):
                data, media_type, extension = encode_image(output.image, job.output_format)
            ctx.check_cancelled()  # a cancelled job stores nothing
            with ctx.phase("store"):
                stored = self.runtime.store.put(
                    ctx.job_id,
                    f"image.{extension}",
                    data,
                    media_type=media_type,
                    metadata={"seed": str(job.seed), "client_request_id": job.client_request_id},
                )
            payload = Img2ImgPayload(job=job, output=output, description=self.provider.describe())
            return JobOutput(payload=payload, artifacts=[ProducedArtifact(stored, data)])

        async for event in self.runtime.runner.run(
            work, delivery=job.delivery, timings=[("preprocess", preprocess_s)], time_remaining=time_remaining
        ):
            yield event

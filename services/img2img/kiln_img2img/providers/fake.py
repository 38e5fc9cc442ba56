"""The fake img2img provider: deterministic noise images, no model."""

from __future__ import annotations

import io
import math

from PIL import Image

from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_runtime.fake import describe_fake, fake_bytes, run_fake_steps, sleep_load
from kiln_runtime.provider import PreviewImage, ProviderDescription, RunContext, Stage
from kiln_runtime.settings import FakeProviderSettings

PREVIEW_SIDE = 32


class FakeImg2ImgProvider:
    """Reports `steps` denoise steps and returns seeded noise of about `output_bytes`.

    The output depends only on the seed and the settings, so equal requests give equal
    bytes; its side is a multiple of 8 like a real SD output.
    """

    def __init__(self, settings: FakeProviderSettings) -> None:
        self.settings = settings
        side = math.isqrt(max(settings.output_bytes // 3, 64))
        self.side = max(8, side - side % 8)

    def describe(self) -> ProviderDescription:
        return describe_fake("kiln/fake-img2img")

    def load(self) -> None:
        sleep_load(self.settings)

    def warmup(self) -> None:
        pass

    def run(self, request: Img2ImgInput, ctx: RunContext) -> Img2ImgOutput:
        with ctx.phase("denoise"):
            run_fake_steps(
                self.settings,
                ctx,
                Stage.DENOISE,
                prompt=request.prompt,
                preview=self._preview(request),
                preview_every=request.preview_every_n_steps,
            )
        with ctx.phase("decode"):
            pixels = fake_bytes(request.seed, self.side * self.side * 3)
            image = Image.frombytes("RGB", (self.side, self.side), pixels)
        return Img2ImgOutput(image=image, steps_run=self.settings.steps)

    def _preview(self, request: Img2ImgInput) -> PreviewImage | None:
        if request.preview_every_n_steps <= 0:
            return None
        buffer = io.BytesIO()
        noise = fake_bytes(request.seed, PREVIEW_SIDE * PREVIEW_SIDE * 3)
        Image.frombytes("RGB", (PREVIEW_SIDE, PREVIEW_SIDE), noise).save(buffer, format="WEBP", quality=60)
        return PreviewImage("image/webp", buffer.getvalue(), PREVIEW_SIDE, PREVIEW_SIDE)

    def close(self) -> None:
        pass

"""The fake img2img provider: deterministic noise images, no model."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence

from PIL import Image

from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_runtime.errors import Cancelled, ProviderFailed
from kiln_runtime.fake import _burn, describe_fake, failing_step, fake_bytes, run_fake_steps, sleep_load
from kiln_runtime.provider import PreviewImage, ProgressUpdate, ProviderDescription, RunContext, Stage
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

    def run_batch(
        self, requests: Sequence[Img2ImgInput], ctxs: Sequence[RunContext]
    ) -> list[Img2ImgOutput | BaseException]:
        """One step delay per step for the whole batch, like a batched model call.

        Each request gets exactly what `run` would give it; a request whose prompt makes the
        fake fail (fail_when_prompt_contains) or whose client left drops out alone.
        """
        settings = self.settings
        outcomes: list[Img2ImgOutput | BaseException | None] = [None] * len(requests)
        previews = [self._preview(request) for request in requests]
        for step in range(1, settings.steps + 1):
            if all(outcome is not None for outcome in outcomes):
                break
            if settings.burn_cpu:
                _burn(settings.step_delay_s)
            else:
                time.sleep(settings.step_delay_s)
            for i, (request, ctx) in enumerate(zip(requests, ctxs, strict=True)):
                if outcomes[i] is not None:
                    continue
                try:
                    ctx.check_cancelled()
                    if step == failing_step(settings, request.prompt):
                        raise ProviderFailed(f"the fake provider failed at step {step} as configured (fail_at_step)")
                    every = request.preview_every_n_steps
                    preview = previews[i] if every and step % every == 0 else None
                    ctx.report(ProgressUpdate(Stage.DENOISE, step, settings.steps, step / settings.steps, preview))
                except (Cancelled, ProviderFailed) as err:
                    outcomes[i] = err
        results: list[Img2ImgOutput | BaseException] = []
        for request, outcome in zip(requests, outcomes, strict=True):
            if outcome is None:
                pixels = fake_bytes(request.seed, self.side * self.side * 3)
                image = Image.frombytes("RGB", (self.side, self.side), pixels)
                outcome = Img2ImgOutput(image=image, steps_run=settings.steps)
            results.append(outcome)
        return results

    def _preview(self, request: Img2ImgInput) -> PreviewImage | None:
        if request.preview_every_n_steps <= 0:
            return None
        buffer = io.BytesIO()
        noise = fake_bytes(request.seed, PREVIEW_SIDE * PREVIEW_SIDE * 3)
        Image.frombytes("RGB", (PREVIEW_SIDE, PREVIEW_SIDE), noise).save(buffer, format="WEBP", quality=60)
        return PreviewImage("image/webp", buffer.getvalue(), PREVIEW_SIDE, PREVIEW_SIDE)

    def close(self) -> None:
        pass

"""What an img2img provider takes and returns; every img2img backend implements this."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from kiln_runtime.provider import Provider, RunContext


@dataclass(frozen=True)
class Img2ImgInput:
    """A validated, preprocessed request: an RGB image and the effective parameters."""

    image: Image.Image
    prompt: str
    negative_prompt: str
    strength: float
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str  # `kiln.img2img.v1.Scheduler` value name without the prefix, e.g. "DPMPP_2M"
    preview_every_n_steps: int


@dataclass(frozen=True)
class Img2ImgOutput:
    """The generated image and what the run did."""

    image: Image.Image
    steps_run: int
    prompt_truncated: bool = False


class Img2ImgModel(Provider[Img2ImgInput, Img2ImgOutput], Protocol):
    """An img2img provider (local diffusers pipeline, vendor API, or the fake)."""


@runtime_checkable
class BatchingImg2ImgModel(Img2ImgModel, Protocol):
    """An img2img provider that can run several compatible requests in one call.

    The requests share `kiln_img2img.batcher.img2img_batch_key`. The result holds one outcome
    per request, in order: its output, or the exception for that request alone (`Cancelled`
    when its client left); an exception raised instead fails every request of the batch.
    """

    def run_batch(
        self, requests: Sequence[Img2ImgInput], ctxs: Sequence[RunContext]
    ) -> list[Img2ImgOutput | BaseException]: ...

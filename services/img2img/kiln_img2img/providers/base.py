"""What an img2img provider takes and returns; every img2img backend implements this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from kiln_runtime.provider import Provider


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

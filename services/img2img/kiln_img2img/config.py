"""Settings of the img2img server: the shared sections plus `KILN_IMG2IMG__...`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, SecretStr, model_validator

from kiln_runtime.profiles import apply_laptop_profile, fill_unset
from kiln_runtime.settings import FakeProviderSettings, KilnSettings, ModelSettings, ServerSettings, ServiceSettings

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class DiffusersSettings(BaseModel):
    """Options of the local Stable Diffusion 1.5 provider (diffusers)."""

    config_dir: Path | None = Field(
        None,
        description="Config-only diffusers folder used with a single-file checkpoint (diffusers would go to the hub).",
    )
    attention_slicing: Literal["auto"] | bool = Field(
        "auto",
        description="Slice attention to save memory; auto: on for Apple GPUs (MPS), off elsewhere (slower with SDPA).",
    )
    vae_slicing: bool = Field(False, description="Decode the VAE one image at a time.")
    vae_tiling: bool = Field(False, description="Decode the VAE in tiles (large outputs; seams may show).")
    cpu_offload: bool = Field(False, description="Keep modules on the CPU until used (CUDA only; needs accelerate).")
    max_side: int = Field(768, ge=64, le=2048, description="Inputs larger than this on either side are scaled down.")
    min_side: int = Field(64, ge=8, le=512, description="Inputs smaller than this on either side are rejected.")

    def slices_attention(self, device: str) -> bool:
        """Whether attention slicing is on for a pipeline on `device` ("cuda", "mps" or "cpu").

        `auto` follows diffusers' advice for Apple GPUs: their memory is the machine's memory, and
        computing attention in slices keeps its peak small; below 64 GB of RAM diffusers reports it
        as faster there, not slower. On CUDA and the CPU, PyTorch's fused attention is faster unsliced.
        """
        if self.attention_slicing == "auto":
            return device == "mps"
        return self.attention_slicing


class GeminiSettings(BaseModel):
    """Options of the Gemini ("Nano Banana") vendor provider."""

    api_key: SecretStr = Field(SecretStr(""), description="Gemini API key (sent as x-goog-api-key; never logged).")
    base_url: str = Field(
        "https://generativelanguage.googleapis.com/v1beta", description="API root; tests point it at a stand-in."
    )
    model: str = Field("gemini-2.5-flash-image", description="Gemini image model to call.")
    timeout_s: PositiveFloat = Field(120.0, description="Timeout of one HTTP call, in seconds.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries after a 429 with a retry delay, before giving up.")
    max_retry_delay_s: PositiveFloat = Field(
        30.0, description="A 429 asking to wait longer than this is not retried; the client gets RetryInfo."
    )


class Img2ImgProviderSettings(ServiceSettings):
    """Which provider serves img2img and its options."""

    provider: Literal["fake", "local", "gemini"] = Field(
        "local", description="local: Stable Diffusion 1.5 on diffusers; gemini: the vendor API; fake: no model."
    )
    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings(id=DEFAULT_MODEL),
        description="The weights the local provider loads.",
    )
    diffusers: DiffusersSettings = Field(default_factory=DiffusersSettings, description="Local provider options.")
    gemini: GeminiSettings = Field(default_factory=GeminiSettings, description="Gemini provider options.")
    fake: FakeProviderSettings = Field(default_factory=FakeProviderSettings, description="Fake provider options.")


class Img2ImgSettings(KilnSettings):
    """Root settings of the img2img server process."""

    img2img: Img2ImgProviderSettings = Field(
        default_factory=lambda: Img2ImgProviderSettings(server=ServerSettings(port=50051, metrics_port=9091)),
        description="The img2img server.",
    )

    @model_validator(mode="after")
    def _apply_profile(self) -> Img2ImgSettings:
        if self.profile == "laptop":
            apply_laptop_profile(self.img2img)
            fill_unset(self.img2img.diffusers, {"attention_slicing": True})
        return self

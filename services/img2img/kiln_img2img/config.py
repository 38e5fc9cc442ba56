"""Settings of the img2img server: the shared sections plus `KILN_IMG2IMG__...`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, SecretStr, model_validator

from kiln_runtime.profiles import apply_laptop_profile, fill_unset
from kiln_runtime.settings import FakeProviderSettings, KilnSettings, ModelSettings, ServerSettings, ServiceSettings

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# -- compiled execution, warm-up and the fp16 VAE guard (issue 14 §2) -------------------------------

CompileMode = Literal["off", "default", "max-autotune", "reduce-overhead"]
"""torch.compile modes; reduce-overhead also captures CUDA graphs (one per warmed shape)."""
# Distinct compiled shapes per module: torch._dynamo recompiles a frame at most this often
# (its recompile limit) before silently running it eagerly, so the warm-up stays within it.
MAX_WARMED_SHAPES = 8


class AccelerationSettings(BaseModel):
    """Compiled execution and warm-up of the local provider (CUDA first; the CPU runs the same code)."""

    compile_unet: CompileMode = Field(
        "off",
        description="torch.compile the UNet: off, default, max-autotune, or reduce-overhead (with CUDA graphs).",
    )
    compile_vae_decoder: CompileMode = Field(
        "off", description="torch.compile the VAE decoder; same modes as compile_unet."
    )
    compile_backend: str = Field(
        "inductor",
        description="torch.compile backend; modes apply to inductor only (aot_eager: capture without code generation).",
    )
    channels_last: bool = Field(
        False, description="Store the UNet and VAE in channels_last memory format (faster convolutions on CUDA)."
    )
    fuse_qkv: bool = Field(
        False, description="Fuse the attention query/key/value projections of the UNet and VAE into one matmul."
    )
    warmup_sizes: list[tuple[int, int]] | Literal["auto"] = Field(
        "auto",
        description=(
            "Output sizes (width, height) warmed and compiled before SERVING; auto: 512x512 on CUDA, "
            "else one 64x64 call. Compiled modules run other sizes eagerly."
        ),
    )
    warmup_batch_sizes: list[int] = Field(
        [1],
        description="Images per pipeline call warmed at each size (with guidance on); other batch sizes run eagerly.",
    )
    vae_guard: bool = Field(
        True, description="Decode again in float32 any image whose VAE decode is NaN or all black (fp16 overflow)."
    )

    @model_validator(mode="after")
    def _bounded_shapes(self) -> AccelerationSettings:
        sizes = [] if self.warmup_sizes == "auto" else self.warmup_sizes
        for width, height in sizes:
            if width % 8 or height % 8 or not 8 <= min(width, height) <= max(width, height) <= 2048:
                raise ValueError(f"warm-up size {width}x{height}: sides must be multiples of 8 in 8..2048")
        if any(not 1 <= batch <= 64 for batch in self.warmup_batch_sizes) or not self.warmup_batch_sizes:
            raise ValueError("warm-up batch sizes must be 1..64, at least one")
        if max(len(sizes), 1) * len(self.warmup_batch_sizes) > MAX_WARMED_SHAPES:
            raise ValueError(f"at most {MAX_WARMED_SHAPES} warm-up shapes (sizes x batch sizes)")
        return self

    def compiles(self) -> bool:
        """Whether any module is compiled."""
        return self.compile_unet != "off" or self.compile_vae_decoder != "off"

    def sizes_for(self, device: str) -> list[tuple[int, int]]:
        """The warm-up sizes on `device`: 512x512 (the real path) on CUDA for auto, else 64x64.

        A 512x512 call costs seconds per step on a CPU even with the tiny test model, and nothing
        is compiled there by default, so auto keeps the old cheap warm-up off CUDA.
        """
        if self.warmup_sizes != "auto":
            return list(self.warmup_sizes)
        return [(512, 512)] if device == "cuda" else [(64, 64)]


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
    acceleration: AccelerationSettings = Field(
        default_factory=AccelerationSettings,
        description="torch.compile, channels_last, fused QKV, warm-up shapes and the fp16 VAE guard.",
    )

    def slices_attention(self, device: str) -> bool:
        """Whether attention slicing is on for a pipeline on `device` ("cuda", "mps" or "cpu").

        `auto` follows diffusers' advice for Apple GPUs: their memory is the machine's memory, and
        computing attention in slices keeps its peak small; below 64 GB of RAM diffusers reports it
        as faster there, not slower. On CUDA and the CPU, PyTorch's fused attention is faster unsliced.
        """
        if self.attention_slicing == "auto":
            return device == "mps"
        return self.attention_slicing


class BatchingSettings(BaseModel):
    """Dynamic batching of compatible img2img jobs into one pipeline call (local provider).

    A batch holds jobs that are running at once, each in its own slot: batches larger than
    `runtime.max_concurrency` never form, so raise both together.
    """

    max_batch_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Most jobs in one pipeline call; 1 turns batching off (every job runs alone, as before).",
    )
    max_batch_delay_ms: float = Field(
        10.0,
        ge=0.0,
        le=10_000.0,
        description="How long the first job of a batch waits for compatible jobs before the batch runs anyway.",
    )


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
    batching: BatchingSettings = Field(
        default_factory=BatchingSettings, description="Dynamic batching (local and fake providers; off by default)."
    )
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

"""Stable Diffusion 1.5 img2img on diffusers: the local provider.

Loading follows the three ways users hold SD1.5 weights: a hub repo id (through the HF
cache), a local diffusers folder, or a single-file LDM checkpoint plus a local config
folder (without `config=` diffusers goes to the hub even when told not to).

Every run builds its own pipeline object around the shared modules with its own scheduler:
a pipeline's `__call__` mutates the pipeline and its scheduler, so two threads sharing one
would silently corrupt both results. The UNet, VAE and text encoder are shared, not copied.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image

from kiln_img2img.config import DiffusersSettings
from kiln_img2img.preview import latents_to_preview
from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_runtime import __version__
from kiln_runtime.device import DeviceChoice
from kiln_runtime.model_source import (
    ModelSource,
    ModelUnavailable,
    SourceKind,
    file_sha256,
    offline_message,
    resolve,
)
from kiln_runtime.provider import ProgressUpdate, ProviderDescription, Reproducibility, RunContext, Stage
from kiln_runtime.settings import ModelSettings

log = logging.getLogger(__name__)

SETTING_PREFIX = "KILN_IMG2IMG"
# Scheduler enum name -> (class, overrides of the model's own scheduler config).
SCHEDULERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "DPMPP_2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "EULER": (EulerDiscreteScheduler, {}),
    "EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    # SD1.5's PNDM config carries clip_sample=True, which DDIM would apply to latents.
    "DDIM": (DDIMScheduler, {"clip_sample": False}),
    "PNDM": (PNDMScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
}
# diffusers pipelines are dynamically typed (attributes come from `register_modules`).
Pipeline = Any
# Share of the progress bar given to denoising; the VAE decode and encoding follow.
DENOISE_SHARE = 0.95
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DiffusersImg2ImgProvider:
    """SD1.5 img2img on one device, loaded once and shared by every run."""

    def __init__(
        self, model: ModelSettings, settings: DiffusersSettings, device: DeviceChoice, *, offline: bool
    ) -> None:
        self.model = model
        self.settings = settings
        self.device = device
        self.offline = offline
        self.dtype = _DTYPES[device.dtype]
        self._base: Pipeline | None = None
        self._source: ModelSource | None = None
        self._revision = model.revision

    def describe(self) -> ProviderDescription:
        return ProviderDescription(
            kind="local",
            model_id=self.model.id,
            model_revision=self._revision,
            device=self.device.device,
            dtype=self.device.dtype,
            library_versions={
                "kiln": __version__,
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
            reproducibility=Reproducibility.BITWISE_SAME_HARDWARE,
        )

    # -- lifecycle ---------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        # Resolved here, not at construction: a missing model is a readable load failure
        # (health NOT_SERVING, GetInfo says why), never a crash of the server.
        self._source = resolve(self.model, setting_prefix=SETTING_PREFIX)
        pipe = self._load_pipeline(self._source)
        pipe.set_progress_bar_config(disable=True)
        if self.settings.cpu_offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(self.device.device)
        if self.settings.slices_attention(self.device.device):
            pipe.enable_attention_slicing()
        if self.settings.vae_slicing:
            pipe.vae.enable_slicing()
        if self.settings.vae_tiling:
            pipe.vae.enable_tiling()
        self._base = pipe
        log.info("loaded %s (%s) in %.1f s", self.model.id, self._source.kind.value, time.perf_counter() - started)

    def _load_pipeline(self, source: ModelSource) -> Pipeline:
        common: dict[str, Any] = {
            "dtype": self.dtype,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
        if source.kind is SourceKind.FOLDER:
            assert source.path is not None
            variant = "fp16" if self._wants_fp16() and any(source.path.glob("*/*.fp16.safetensors")) else None
            return StableDiffusionImg2ImgPipeline.from_pretrained(
                str(source.path), local_files_only=True, variant=variant, **common
            )
        if source.kind is SourceKind.SINGLE_FILE:
            assert source.path is not None
            config_dir = self.settings.config_dir
            if config_dir is None or not config_dir.is_dir():
                raise ModelUnavailable(
                    f"{source.path.name} is a single-file checkpoint; set {SETTING_PREFIX}__DIFFUSERS__CONFIG_DIR "
                    "to a config-only SD1.5 diffusers folder (model_index.json, component configs, tokenizer)"
                )
            self._revision = file_sha256(source.path)
            return StableDiffusionImg2ImgPipeline.from_single_file(
                str(source.path), config=str(config_dir), local_files_only=True, **common
            )
        return self._load_from_hub(source, common)

    def _load_from_hub(self, source: ModelSource, common: dict[str, Any]) -> Pipeline:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        revision = source.revision or None
        cache_dir = str(source.cache_dir) if source.cache_dir else None
        attempts: list[str | None] = ["fp16", None] if self._wants_fp16() else [None]
        for variant in attempts:
            try:
                pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                    source.id,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=self.offline,
                    variant=variant,
                    **common,
                )
                break
            except ValueError as err:
                if variant is None or "variant" not in str(err):
                    raise
                log.info("no fp16 weights in %s; loading the full-precision files", source.id)
            except (OSError, LocalEntryNotFoundError) as err:
                if self.offline:
                    raise ModelUnavailable(offline_message(source, SETTING_PREFIX, err)) from err
                raise ModelUnavailable(f"could not fetch {source.id!r} from the hub: {err}") from err
        snapshot = snapshot_download(
            source.id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=True,
            allow_patterns=["model_index.json"],
        )
        self._revision = snapshot.rstrip("/").rsplit("/", 1)[-1]  # the snapshot folder is the commit hash
        return pipe

    def _wants_fp16(self) -> bool:
        return self.device.device == "cuda" and self.dtype is torch.float16

    def warmup(self) -> None:
        # The first call pays kernel and allocator set-up; a 1-step run keeps it off the first job.
        warm = Img2ImgInput(
            image=Image.new("RGB", (64, 64), (127, 127, 127)),
            prompt="warm-up",
            negative_prompt="",
            strength=1.0,
            num_inference_steps=1,
            guidance_scale=1.0,
            seed=0,
            scheduler="EULER",
            preview_every_n_steps=0,
        )
        self.run(warm, RunContext("warmup", report=lambda update: None))

    def close(self) -> None:
        # Dropping the pipeline drops the UNet, VAE and text encoder (per-run pipelines are gone
        # with their runs); the model manager then empties the device cache (kiln_runtime.memory).
        # `load()` builds everything again, so an idle-unloaded provider is reloaded in place.
        self._base = None
        self._source = None

    # -- running -----------------------------------------------------------------------

    def pipeline_for(self, scheduler: str) -> Pipeline:
        """A pipeline that shares the loaded modules but owns a fresh scheduler."""
        if self._base is None:
            raise RuntimeError("the model is not loaded")
        scheduler_type, overrides = SCHEDULERS[scheduler]
        fresh = scheduler_type.from_config(self._base.scheduler.config, **overrides)
        pipe: Pipeline = StableDiffusionImg2ImgPipeline(
            **{**self._base.components, "scheduler": fresh}, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)  # progress goes to the stream, not to stderr
        return pipe

    def prompt_truncated(self, prompt: str) -> bool:
        assert self._base is not None
        tokenizer = self._base.tokenizer
        return bool(len(tokenizer(prompt).input_ids) > tokenizer.model_max_length)

    def run(self, request: Img2ImgInput, ctx: RunContext) -> Img2ImgOutput:
        pipe = self.pipeline_for(request.scheduler)
        truncated = self.prompt_truncated(request.prompt) or self.prompt_truncated(request.negative_prompt)
        # A CPU generator draws the same noise on every device, so a seed means the same image.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        started = time.perf_counter()
        last_step_at = started

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal last_step_at
            total = int(pipe.num_timesteps)
            done = step + 1
            every = request.preview_every_n_steps
            preview = latents_to_preview(tensors["latents"]) if every and done % every == 0 else None
            # report() raises Cancelled when the client left: the loop stops before the VAE decode.
            ctx.report(ProgressUpdate(Stage.DENOISE, done, total, DENOISE_SHARE * done / total, preview))
            if done == total:
                ctx.report(ProgressUpdate(Stage.DECODE, 0, 0, DENOISE_SHARE))
            last_step_at = time.perf_counter()
            return tensors

        with torch.inference_mode():
            result = pipe(
                prompt=request.prompt,
                image=request.image,
                strength=request.strength,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                negative_prompt=request.negative_prompt or None,
                generator=generator,
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
                output_type="pil",
            )
        finished = time.perf_counter()
        ctx.timer.add("denoise", last_step_at - started)
        ctx.timer.add("decode", finished - last_step_at)
        image = result.images[0]
        return Img2ImgOutput(image=image, steps_run=int(pipe.num_timesteps), prompt_truncated=truncated)

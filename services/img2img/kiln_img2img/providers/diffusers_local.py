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
from collections.abc import Sequence
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

from kiln_img2img.acceleration import Accelerated, accelerate
from kiln_img2img.config import DiffusersSettings
from kiln_img2img.preview import latents_to_preview
from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_img2img.vae_guard import VaeGuard
from kiln_runtime import __version__
from kiln_runtime.device import DeviceChoice
from kiln_runtime.errors import Cancelled
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
from kiln_runtime.telemetry.metrics import ServiceMetrics

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
        self._accelerated: Accelerated | None = None
        self._vae_guard: VaeGuard | None = None
        self._metrics: ServiceMetrics | None = None

    def attach_metrics(self, metrics: ServiceMetrics) -> None:
        """Count VAE re-decodes and eager fallbacks of compiled modules on the server's metrics."""
        self._metrics = metrics

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
        self._accelerate(pipe)
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

    def _accelerate(self, pipe: Pipeline) -> None:
        acceleration = self.settings.acceleration
        if acceleration.vae_guard:
            # Before fusing and compiling: the guard's float32 copy is a plain eager VAE.
            self._vae_guard = VaeGuard(pipe.vae, on_redo=self._count_redecode)
        if self.settings.cpu_offload:
            if acceleration.compiles() or acceleration.channels_last or acceleration.fuse_qkv:
                # Offload hooks move the weights in and out around every call: nothing to specialise on.
                log.warning("cpu_offload is on: torch.compile, channels_last and fused QKV are not applied")
            return
        self._accelerated = accelerate(pipe, acceleration, self.device.device)
        self._accelerated.set_fallback_counter(self._count_fallback)

    def _count_redecode(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.count_vae_redecode(reason)

    def _count_fallback(self, module: str) -> None:
        if self._metrics is not None:
            self._metrics.count_compile_fallback(module)

    def warmup(self) -> None:
        """Run the real path (guidance on) once per warm-up size and batch size, before SERVING.

        The first calls pay kernel selection and allocator set-up; compiled modules compile, and
        in reduce-overhead mode capture their CUDA graphs, for exactly these shapes here (their
        gates learn them; kiln_img2img.acceleration), so no job waits on a compile. Three steps:
        CUDA graph trees run a shape once eagerly, record it on the second call, replay from the third.
        """
        acceleration = self.settings.acceleration
        accelerated = self._accelerated
        steps = 3 if accelerated is not None and accelerated.gates else 1
        if accelerated is not None:
            accelerated.learning(True)
        try:
            for width, height in acceleration.sizes_for(self.device.device):
                for batch in acceleration.warmup_batch_sizes:
                    started = time.perf_counter()
                    self._warm_call(width, height, batch, steps)
                    log.info("warmed %dx%d x%d in %.1f s", width, height, batch, time.perf_counter() - started)
        finally:
            if accelerated is not None:
                accelerated.learning(False)

    def _warm_call(self, width: int, height: int, batch: int, steps: int) -> None:
        warm = Img2ImgInput(
            image=Image.new("RGB", (width, height), (127, 127, 127)),
            prompt="warm-up",
            negative_prompt="",
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=7.5,  # guidance on: the UNet sees the doubled batch jobs send it
            seed=0,
            scheduler="EULER",
            preview_every_n_steps=0,
        )
        if batch == 1:
            self.run(warm, RunContext("warmup", report=lambda update: None))
            return
        # The call a batch of `batch` jobs makes (lists of prompts, images and generators): the same
        # UNet, text encoder and VAE shapes, without the per-job progress bookkeeping.
        pipe = self.pipeline_for(warm.scheduler)
        with torch.inference_mode():
            pipe(
                prompt=[warm.prompt] * batch,
                image=[warm.image] * batch,
                strength=warm.strength,
                num_inference_steps=steps,
                guidance_scale=warm.guidance_scale,
                negative_prompt=[warm.negative_prompt] * batch,
                generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
                output_type="pil",
            )

    def close(self) -> None:
        # Dropping the pipeline drops the UNet, VAE and text encoder (per-run pipelines are gone
        # with their runs); the model manager then empties the device cache (kiln_runtime.memory).
        # `load()` builds everything again, so an idle-unloaded provider is reloaded in place.
        self._base = None
        self._source = None
        self._vae_guard = None
        if self._accelerated is not None and self._accelerated.gates:
            # Compiled code and CUDA graph pools outlive the modules in torch._dynamo's caches;
            # an idle unload must give that memory back too. (The cache is per process: a server
            # holds one model, so nothing else loses its compiled code.)
            torch._dynamo.reset()
        self._accelerated = None

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

    def run_batch(
        self, requests: Sequence[Img2ImgInput], ctxs: Sequence[RunContext]
    ) -> list[Img2ImgOutput | BaseException]:
        """Several requests with one `img2img_batch_key` in one pipeline call.

        Each sample draws its noise from its own CPU generator (diffusers takes a list), so a
        request's image does not depend on its batch mates, up to float rounding: batched
        matrix products may sum in another order, within 1e-4 of the unbatched float output
        (tests/img2img/test_batching.py). A cancelled request stops receiving progress and gets
        `Cancelled`; its sample keeps running so the others stay unchanged, and the call stops
        only when every request of the batch is cancelled. A batch of one is `run` itself.
        """
        if len(requests) == 1:
            try:
                return [self.run(requests[0], ctxs[0])]
            except Exception as err:
                return [err]
        first = requests[0]
        pipe = self.pipeline_for(first.scheduler)
        truncated = [self.prompt_truncated(r.prompt) or self.prompt_truncated(r.negative_prompt) for r in requests]
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        dropped: list[BaseException | None] = [None] * len(requests)
        started = time.perf_counter()
        last_step_at = started

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal last_step_at
            total = int(pipe.num_timesteps)
            done = step + 1
            latents = tensors["latents"]
            for i, (request, ctx) in enumerate(zip(requests, ctxs, strict=True)):
                if dropped[i] is not None:
                    continue
                every = request.preview_every_n_steps
                preview = latents_to_preview(latents[i : i + 1]) if every and done % every == 0 else None
                try:
                    ctx.report(ProgressUpdate(Stage.DENOISE, done, total, DENOISE_SHARE * done / total, preview))
                    if done == total:
                        ctx.report(ProgressUpdate(Stage.DECODE, 0, 0, DENOISE_SHARE))
                except Cancelled as err:
                    dropped[i] = err
            if all(err is not None for err in dropped):
                raise Cancelled("every job of the batch was cancelled")  # skips the VAE decode
            last_step_at = time.perf_counter()
            return tensors

        try:
            with torch.inference_mode():
                result = pipe(
                    prompt=[r.prompt for r in requests],
                    image=[r.image for r in requests],
                    strength=first.strength,
                    num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale,
                    # "" encodes exactly as None does (diffusers' unconditional prompt is "").
                    negative_prompt=[r.negative_prompt for r in requests],
                    generator=generators,
                    callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=["latents"],
                    output_type="pil",
                )
        except Cancelled:
            return [d if d is not None else Cancelled("the batch was cancelled") for d in dropped]
        finished = time.perf_counter()
        outcomes: list[Img2ImgOutput | BaseException] = []
        for i, ctx in enumerate(ctxs):
            ctx.timer.add("denoise", last_step_at - started)
            ctx.timer.add("decode", finished - last_step_at)
            cancelled = dropped[i]
            if cancelled is not None:
                outcomes.append(cancelled)
                continue
            image = result.images[i]
            outcomes.append(
                Img2ImgOutput(image=image, steps_run=int(pipe.num_timesteps), prompt_truncated=truncated[i])
            )
        return outcomes

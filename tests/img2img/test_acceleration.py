"""Compiled execution on the CPU: the shape gate, channels_last, fused QKV and the warm-up, with the tiny model.

Inductor (the CUDA code generator, also the CPU default) needs minutes to compile even the tiny
UNet on this CI's cores, so these tests compile with `aot_eager` (torch._dynamo captures the same
graphs and AOTAutograd traces them, without code generation) and with torch's counting backend.
What only a GPU shows, inductor kernels, CUDA graph capture and their speed, runs in the CUDA test
below and in benchmarks/gpu/.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from kiln_img2img.acceleration import ShapeGate
from kiln_img2img.config import AccelerationSettings, DiffusersSettings, Img2ImgSettings
from kiln_img2img.providers.base import Img2ImgInput
from kiln_img2img.providers.diffusers_local import DiffusersImg2ImgProvider
from kiln_img2img.testing.tiny_models import TinyModels
from kiln_runtime.device import CPU, DeviceChoice
from kiln_runtime.provider import RunContext
from kiln_runtime.settings import ModelSettings
from kiln_runtime.telemetry.metrics import ServiceMetrics

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gate_compiles_warmed_shapes_only() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    reference = torch.nn.Conv2d(4, 4, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    counter = CompileCounter()  # a real torch.compile backend that counts the graphs dynamo hands it
    fallbacks: list[str] = []
    gate = ShapeGate(conv, "conv", mode="default", backend=counter, max_shapes=2, on_fallback=fallbacks.append)
    x8, x16, x32 = (torch.randn(1, 4, side, side) for side in (8, 16, 32))
    gate.learning = True
    conv(x8)
    conv(x16)
    conv(x32)  # beyond max_shapes: eager even while learning
    gate.learning = False
    assert counter.frame_count == 2 and len(gate.warmed) == 2
    for _ in range(3):  # unwarmed shapes again and again: eager, never a recompile
        assert torch.equal(conv(x32), reference(x32))
        assert conv(torch.randn(2, 4, 8, 8)).shape == (2, 4, 8, 8)
    assert torch.equal(conv(x8), reference(x8))  # warmed: the compiled graph, same numbers
    assert counter.frame_count == 2
    assert gate.fallbacks == 7 and fallbacks == ["conv"] * 7
    gate.remove()
    conv(torch.randn(1, 4, 4, 4))
    assert counter.frame_count == 2 and gate.fallbacks == 7  # the module's own forward again


def test_acceleration_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "KILN_IMG2IMG__DIFFUSERS__ACCELERATION__"
    monkeypatch.setenv(prefix + "COMPILE_UNET", "reduce-overhead")
    monkeypatch.setenv(prefix + "WARMUP_SIZES", "[[512, 512], [768, 512]]")
    monkeypatch.setenv(prefix + "WARMUP_BATCH_SIZES", "[1, 4]")
    acceleration = Img2ImgSettings().img2img.diffusers.acceleration
    assert acceleration.compile_unet == "reduce-overhead" and acceleration.compile_vae_decoder == "off"
    assert acceleration.sizes_for("cpu") == [(512, 512), (768, 512)]
    assert acceleration.warmup_batch_sizes == [1, 4] and acceleration.compiles()
    default = AccelerationSettings()
    assert default.sizes_for("cuda") == [(512, 512)] and default.sizes_for("cpu") == [(64, 64)]
    assert not default.compiles() and default.vae_guard
    with pytest.raises(ValidationError, match="multiples of 8"):
        AccelerationSettings(warmup_sizes=[(100, 100)])
    with pytest.raises(ValidationError, match="at most 8"):
        AccelerationSettings(warmup_sizes=[(512, 512), (768, 768), (512, 768)], warmup_batch_sizes=[1, 2, 4])
    with pytest.raises(ValidationError):
        AccelerationSettings.model_validate({"compile_unet": "fast"})


def job(size: tuple[int, int], scheduler: str = "EULER", seed: int = 7) -> Img2ImgInput:
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    return Img2ImgInput(
        image=Image.fromarray(gradient),
        prompt="a red fox",
        negative_prompt="blurry",
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=7.5,
        seed=seed,
        scheduler=scheduler,
        preview_every_n_steps=2,
    )


def pixels(provider: DiffusersImg2ImgProvider, request: Img2ImgInput) -> np.ndarray[Any, Any]:
    output = provider.run(request, RunContext("test", report=lambda update: None))
    return np.asarray(output.image, dtype=np.int16)


def load(tiny: TinyModels, device: DeviceChoice = CPU, **acceleration: Any) -> DiffusersImg2ImgProvider:
    settings = DiffusersSettings(acceleration=AccelerationSettings(**acceleration))
    provider = DiffusersImg2ImgProvider(ModelSettings(id=str(tiny.diffusers_dir)), settings, device, offline=True)
    provider.load()
    return provider


@pytest.fixture(scope="module")
def eager(tiny: TinyModels) -> Iterator[DiffusersImg2ImgProvider]:
    provider = load(tiny)
    yield provider
    provider.close()


def fallbacks(metrics: ServiceMetrics, module: str) -> float:
    labels = {"service": "img2img", "module": module}
    return metrics.registry.get_sample_value("kiln_compile_fallbacks_total", labels) or 0.0


def test_warmup_runs_each_size_and_batch_size_with_guidance(tiny: TinyModels) -> None:
    provider = load(tiny, warmup_sizes=[(64, 64), (96, 64)], warmup_batch_sizes=[1, 2])
    assert provider._base is not None
    seen: list[tuple[int, ...]] = []
    hook = provider._base.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    provider.warmup()
    hook.remove()
    # Guidance on: the UNet sees twice the images. Nothing compiled: one step per shape.
    assert seen == [(2, 4, 8, 8), (4, 4, 8, 8), (2, 4, 8, 12), (4, 4, 8, 12)]
    provider.close()


def test_compiled_provider_warms_its_shapes_and_runs_others_eagerly(
    tiny: TinyModels, eager: DiffusersImg2ImgProvider
) -> None:
    # backend eager: torch._dynamo captures and guards the graphs (about 10 s per module and shape
    # here), then runs them op by op; the numbers are eager's, so compiled == eager exactly.
    provider = load(
        tiny,
        compile_unet="default",
        compile_vae_decoder="default",
        compile_backend="eager",
        warmup_sizes=[(64, 64)],
        warmup_batch_sizes=[1],
    )
    metrics = ServiceMetrics("img2img")
    provider.attach_metrics(metrics)
    assert provider._base is not None
    seen: list[tuple[int, ...]] = []
    hook = provider._base.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    graphs = counters["stats"]["unique_graphs"]
    provider.warmup()
    hook.remove()
    assert seen == [(2, 4, 8, 8)] * 3  # 3 steps when compiling: CUDA graph trees record on the 2nd call
    assert counters["stats"]["unique_graphs"] == graphs + 2  # one UNet graph, one decoder graph
    assert provider._accelerated is not None
    unet, decoder = provider._accelerated.gates
    assert len(unet.warmed) == 1 and len(decoder.warmed) == 1 and not unet.learning

    # A warmed shape runs compiled, also under a scheduler with integer timesteps (one graph for both).
    for scheduler in ("EULER", "DDIM"):
        assert np.array_equal(pixels(provider, job((64, 64), scheduler)), pixels(eager, job((64, 64), scheduler)))
    assert fallbacks(metrics, "unet") == 0 and fallbacks(metrics, "vae_decoder") == 0

    # An unwarmed size runs eagerly and is counted; nothing is compiled for it.
    unwarmed = job((64, 128))
    assert np.array_equal(pixels(provider, unwarmed), pixels(eager, unwarmed))
    assert fallbacks(metrics, "unet") == 3 and fallbacks(metrics, "vae_decoder") == 1  # int(4 x 0.75) steps
    assert counters["stats"]["unique_graphs"] == graphs + 2
    provider.close()


def test_channels_last_and_fused_qkv_match_eager(tiny: TinyModels, eager: DiffusersImg2ImgProvider) -> None:
    provider = load(tiny, channels_last=True, fuse_qkv=True)
    assert provider._base is not None
    unet = provider._base.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(hasattr(module, "to_qkv") for module in unet.modules())
    provider.warmup()
    request = job((96, 64))
    # Other kernels and one fused matmul instead of three: float rounding, within one level.
    assert np.abs(pixels(provider, request) - pixels(eager, request)).max() <= 1
    provider.close()


@cuda
def test_reduce_overhead_on_cuda_matches_eager(tiny: TinyModels) -> None:
    device = DeviceChoice("cuda", "float16")
    compiled = load(
        tiny, device, compile_unet="reduce-overhead", compile_vae_decoder="default", warmup_sizes=[(64, 64)]
    )
    compiled.warmup()
    plain = load(tiny, device)
    request = job((64, 64))
    # fp16 with inductor's fused kernels: small rounding differences may move a few levels.
    assert np.abs(pixels(compiled, request) - pixels(plain, request)).max() <= 4
    assert compiled._accelerated is not None and all(gate.fallbacks == 0 for gate in compiled._accelerated.gates)
    compiled.close()
    plain.close()

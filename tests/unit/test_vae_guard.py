"""The fp16 VAE guard on the tiny SD1.5 VAE: a NaN or all-black decode is redone in float32 and counted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL

from kiln_img2img.testing.tiny_models import VAE_CONFIG
from kiln_img2img.vae_guard import VaeGuard, bad_images
from kiln_runtime.telemetry.metrics import ServiceMetrics


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Decodes are compared bit for bit: pin the reduction order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    vae: Any = AutoencoderKL(**VAE_CONFIG)  # diffusers' registered-config classes confuse mypy
    return vae.to(dtype).eval()


def inject_once(vae: Any, value: float, sample: int) -> list[int]:
    """A decoder hook that overwrites image `sample` of the next decode with `value`, once."""
    calls: list[int] = []

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        calls.append(output.shape[0])
        if len(calls) > 1:
            return output
        poisoned = output.clone()
        poisoned[sample] = value
        return poisoned

    vae.decoder.register_forward_hook(hook)
    return calls


def redecodes(metrics: ServiceMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("kiln_vae_redecodes_total", {"service": "img2img", "reason": reason})
    return value or 0.0


@pytest.mark.parametrize(("value", "reason"), [(float("nan"), "nan"), (float("inf"), "nan"), (-1.0, "black")])
def test_a_bad_image_is_decoded_again_and_counted(value: float, reason: str) -> None:
    vae = tiny_vae()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        clean = vae.decode(latents, return_dict=False)[0]
    metrics = ServiceMetrics("img2img")
    guard = VaeGuard(vae, on_redo=metrics.count_vae_redecode)
    calls = inject_once(vae, value, sample=1)
    with torch.inference_mode():
        fixed = vae.decode(latents, return_dict=False)[0]
    assert calls == [2, 1]  # the batch, then image 1 alone again
    assert torch.equal(fixed[0], clean[0])  # the good image is untouched, bit for bit
    # Batch 1 vs 2 may sum in another order: 1e-4 is far below one pixel step (2/255).
    torch.testing.assert_close(fixed[1], clean[1], rtol=0, atol=1e-4)
    assert guard.redone[reason] == 1 and sum(guard.redone.values()) == 1
    assert redecodes(metrics, reason) == 1.0
    with torch.inference_mode():  # the hook fired once: later decodes are clean and not redone
        assert torch.equal(vae.decode(latents).sample, clean)
    assert redecodes(metrics, reason) == 1.0


def test_clean_decodes_pass_through_unchanged() -> None:
    vae = tiny_vae()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = vae.decode(latents).sample
        guard = VaeGuard(vae)
        after = vae.decode(latents).sample
    assert torch.equal(before, after) and guard.redone == {"nan": 0, "black": 0}
    guard.remove()
    assert vae.decode.__self__ is vae  # the VAE's own method again


def test_half_precision_redoes_on_a_float32_copy() -> None:
    vae = tiny_vae(torch.bfloat16)  # CPU kernels for bfloat16 are complete; the path is the same for float16
    guard = VaeGuard(vae)
    assert guard.fallback is not None and guard.fallback.dtype == torch.float32
    inject_once(vae, float("nan"), sample=0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fixed = vae.decode(latents.to(torch.bfloat16)).sample
        reference = guard.fallback.decode(latents.to(torch.bfloat16).float()).sample
    assert fixed.dtype == torch.bfloat16  # the pipeline gets back what it asked for
    assert guard.redone["nan"] == 1
    torch.testing.assert_close(fixed, reference.to(torch.bfloat16), rtol=0, atol=0)


def test_bad_images_reasons() -> None:
    sample = torch.zeros(4, 3, 2, 2)
    sample[1, 0, 0, 0] = float("nan")
    sample[2] = -1.0
    sample[3] = -1.0
    sample[3, 2, 1, 1] = -0.99  # one pixel above black: a dark image, not a failed decode
    assert bad_images(sample) == [(1, "nan"), (2, "black")]

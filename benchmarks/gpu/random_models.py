"""Random-weight models in the real on-disk formats, at SD1.5's and TripoSR's full sizes or tiny.

The device check must measure the real architectures without downloading anything, and load them
through the same code the servers use. So this module writes, from configurations held in code:

- SD1.5 as a diffusers `save_pretrained` folder (UNet, VAE, CLIP text encoder at SD1.5's published
  dimensions, the verbatim PNDM scheduler config, a CLIP tokenizer) - the layout of the tiny test
  model (`kiln_img2img.testing.tiny_models`), whose tokenizer and scheduler files it reuses. The
  tokenizer is that small one: its ids are a subset of the full 49408-entry vocabulary, and the
  compute per prompt (77 tokens) is the same;
- TripoSR as `config.yaml` (the published one) + `model.safetensors`, with the planted ellipsoid of
  `kiln_mesh.testing.tiny_triposr` (its weight generator is generic in the config), so that
  marching cubes meets one closed surface of a realistic size rather than random-field noise.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch

from kiln_img2img.testing import tiny_models
from kiln_mesh.testing import tiny_triposr
from kiln_mesh.triposr import CONFIG_FILE, SAFETENSORS_FILE
from kiln_mesh.triposr.config import PUBLISHED_CONFIG_YAML

__all__ = ["RESIDUAL_DAMPING", "SD15_TEXT_ENCODER", "SD15_UNET", "SD15_VAE", "write_sd15", "write_triposr"]

# The stable-diffusion-v1-5 repo's unet/config.json, vae/config.json and text_encoder/config.json
# (the values that differ from the libraries' defaults or from the tiny model).
SD15_UNET: Final[Mapping[str, Any]] = {
    **tiny_models.UNET_CONFIG,
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE: Final[Mapping[str, Any]] = {
    **tiny_models.VAE_CONFIG,
    "block_out_channels": (128, 256, 512, 512),
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD15_TEXT_ENCODER: Final[Mapping[str, Any]] = {
    **tiny_models.TEXT_ENCODER_CONFIG,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

RESIDUAL_DAMPING: Final = 0.05


def write_sd15(folder: Path, *, full: bool, device: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """Write a random-weight SD1.5 diffusers folder (full size, or the tiny test dimensions).

    Args:
        folder: Destination; created (an existing one is replaced).
        full: SD1.5's published dimensions (about 1 B parameters) instead of the tiny ones.
        device: Where the weights are initialised (CUDA makes the full-size init take seconds).
        dtype: Dtype of the stored weights (float16 halves the 4 GB a full fp32 folder takes).
        seed: Seeds the weights.

    Returns:
        `folder`, loadable with `StableDiffusionImg2ImgPipeline.from_pretrained(folder)` and by the
        img2img server's local provider.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    tokenizer_files = folder.parent / f".{folder.name}-tokenizer"
    shutil.rmtree(tokenizer_files, ignore_errors=True)
    tiny_models._write_tokenizer_files(tokenizer_files)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_files), local_files_only=True)
    vocab, _ = tiny_models._clip_vocab()
    text_config: dict[str, Any] = dict(SD15_TEXT_ENCODER if full else tiny_models.TEXT_ENCODER_CONFIG)
    text_config.setdefault("vocab_size", len(vocab))
    text_config["bos_token_id"] = vocab[tiny_models.BOS_TOKEN]
    text_config["eos_token_id"] = text_config["pad_token_id"] = vocab[tiny_models.EOS_TOKEN]
    # Any: mypy resolves top-level diffusers names to the dummy classes of its TYPE_CHECKING branch.
    unet: Any
    vae: Any
    text_encoder: Any
    with torch.random.fork_rng(devices=[]), torch.device(device):  # init on the GPU: seconds, not minutes
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(SD15_UNET if full else tiny_models.UNET_CONFIG))
        vae = AutoencoderKL(**(SD15_VAE if full else tiny_models.VAE_CONFIG))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    scheduler_config = {k: v for k, v in tiny_models.SCHEDULER_CONFIG.items() if not k.startswith("_")}
    # Saved from the CPU: the folder is written once, and the GPU's memory is wanted for what follows.
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae.to("cpu", dtype),
        text_encoder=text_encoder.to("cpu", dtype),
        tokenizer=tokenizer,
        unet=unet.to("cpu", dtype),
        scheduler=PNDMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[attr-defined]
    # The classic vocab/merges tokenizer files and the verbatim scheduler config, as users' folders have.
    shutil.rmtree(folder / "tokenizer")
    shutil.move(tokenizer_files, folder / "tokenizer")
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(tiny_models.SCHEDULER_CONFIG, indent=2) + "\n", encoding="utf-8"
    )
    return folder


def write_triposr(folder: Path, *, full: bool, seed: int = 0) -> Path:
    """Write a TripoSR folder: the published config (full) or the tiny one, with planted weights.

    Args:
        folder: Destination; created (existing weight files are replaced).
        full: The published `stabilityai/TripoSR` dimensions (DINO ViT-B/16, 16-layer backbone).
        seed: Seeds the weights.

    Returns:
        `folder`, loadable with `kiln_mesh.triposr.load_triposr` and by the mesh server.
    """
    if not full:
        return tiny_triposr.write_tiny_triposr(folder, seed=seed, fmt="safetensors")
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # No vit_config.json: the loader then uses its built-in facebook/dino-vitb16 hyper-parameters.
    (folder / CONFIG_FILE).write_text(PUBLISHED_CONFIG_YAML, encoding="utf-8")
    state = tiny_triposr._tiny_state_dict(folder, seed)
    # Sixteen backbone layers at full width move the planted surface much more than the tiny model's
    # two: damp the residual branch further, so the image still shapes the mesh, but only slightly.
    state["backbone.proj_out.weight"] *= RESIDUAL_DAMPING
    state["backbone.proj_out.bias"] *= RESIDUAL_DAMPING
    _clean_density_path(state)
    save_file(dict(state), str(folder / SAFETENSORS_FILE))
    return folder


def _clean_density_path(state: dict[str, torch.Tensor]) -> None:
    """Remove the small noise the tiny generator adds along the planted density path.

    At full width (120 decoder inputs, 9 hidden layers) that noise adds up to bumps at the triplane's
    texel scale, and a 256^3 mesh of the bumpy surface has several times the faces of a real object.
    Without it the density is a function of the planted quadratic alone: a smooth closed surface of
    about 10^5 vertices at 256^3, which is what TripoSR gives for a typical object.
    """
    layers = sorted(int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.") and k.endswith(".weight"))
    first = state[f"decoder.layers.{layers[0]}.weight"]
    channels = first.shape[1] // 3  # concatenated features of the three planes
    keep = torch.zeros_like(first[0])
    keep[::channels] = 1.0  # channel 0 of each plane carries the planted quadratic
    first[0] *= keep
    for index in layers[1:]:
        state[f"decoder.layers.{index}.weight"][0, 1:] = 0.0

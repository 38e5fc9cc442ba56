"""Convert SD1.x diffusers state dicts into one original-layout (LDM / A1111) checkpoint state dict.

diffusers ships only the LDM -> diffusers direction (`diffusers.loaders.single_file_utils`), so the
tests need this reverse mapping to produce the single-file form users download. It covers the SD1.x
topology only: 4 UNet levels with 2 resnets each (cross-attention in the first 3 down levels and the
last 3 up levels) and a 4-level VAE. Widths do not matter, so tiny models convert too. A key outside
that topology raises, rather than being written under a name no loader would look for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

__all__ = ["diffusers_to_ldm"]

_LEVELS = 4
_LAYERS = 2  # resnets per down level; up levels have one more (they also consume the skip of the downsampler)

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _level(text: str, limit: int = _LEVELS) -> int:
    index = int(text)
    if index >= limit:
        raise ValueError(f"index {index} is outside the SD1.x topology (limit {limit})")
    return index


def _unet_resnet(part: str) -> str:
    return _UNET_RESNET[part]


def _up_upsampler_slot(level: int) -> int:
    # An LDM output block is [resnet, (attention), upsample]; up level 0 is the one without attention.
    return 1 if level == 0 else 2


_UNET_RULES: list[_Rule] = [
    (
        re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)"),
        lambda m: f"input_blocks.{3 * _level(m[1]) + _level(m[2], _LAYERS) + 1}.0.{_unet_resnet(m[3])}",
    ),
    (
        re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
        lambda m: f"input_blocks.{3 * _level(m[1], _LEVELS - 1) + _level(m[2], _LAYERS) + 1}.1.{m[3]}",
    ),
    (
        re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv"),
        lambda m: f"input_blocks.{3 * (_level(m[1], _LEVELS - 1) + 1)}.0.op",
    ),
    (
        re.compile(r"mid_block\.resnets\.(\d+)\.(\w+)"),
        lambda m: f"middle_block.{2 * _level(m[1], 2)}.{_unet_resnet(m[2])}",
    ),
    (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m[1]}"),
    (
        re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)"),
        lambda m: f"output_blocks.{3 * _level(m[1]) + _level(m[2], _LAYERS + 1)}.0.{_unet_resnet(m[3])}",
    ),
    (
        re.compile(r"up_blocks\.([1-9]\d*)\.attentions\.(\d+)\.(.+)"),
        lambda m: f"output_blocks.{3 * _level(m[1]) + _level(m[2], _LAYERS + 1)}.1.{m[3]}",
    ),
    (
        re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv"),
        lambda m: f"output_blocks.{3 * _level(m[1], _LEVELS - 1) + 2}.{_up_upsampler_slot(int(m[1]))}.conv",
    ),
    *((re.compile(re.escape(hf)), lambda _m, ldm=ldm: ldm) for hf, ldm in _UNET_FIXED.items()),
]

_VAE_RULES: list[_Rule] = [
    (re.compile(r"(encoder|decoder)\.(conv_in|conv_out)"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"(encoder|decoder)\.conv_norm_out"), lambda m: f"{m[1]}.norm_out"),
    (re.compile(r"quant_conv|post_quant_conv"), lambda m: m[0]),
    (
        re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)"),
        lambda m: f"encoder.down.{_level(m[1])}.block.{_level(m[2], _LAYERS)}.{_VAE_RESNET[m[3]]}",
    ),
    (
        re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv"),
        lambda m: f"encoder.down.{_level(m[1], _LEVELS - 1)}.downsample.conv",
    ),
    # The LDM decoder numbers its levels from the lowest resolution up; diffusers from the top down.
    (
        re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)"),
        lambda m: f"decoder.up.{_LEVELS - 1 - _level(m[1])}.block.{_level(m[2], _LAYERS + 1)}.{_VAE_RESNET[m[3]]}",
    ),
    (
        re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv"),
        lambda m: f"decoder.up.{_LEVELS - 1 - _level(m[1], _LEVELS - 1)}.upsample.conv",
    ),
    (
        re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)"),
        lambda m: f"{m[1]}.mid.block_{_level(m[2], 2) + 1}.{_VAE_RESNET[m[3]]}",
    ),
    (
        re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)"),
        lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}",
    ),
]


def _rename(key: str, rules: list[_Rule], what: str) -> str:
    module, dot, param = key.rpartition(".")
    if not dot:
        raise ValueError(f"unexpected {what} key {key!r}")
    for pattern, build in rules:
        match = pattern.fullmatch(module)
        if match is not None:
            try:
                return f"{build(match)}.{param}"
            except (KeyError, ValueError) as exc:
                raise ValueError(f"cannot map {what} key {key!r} to the SD1.x LDM layout: {exc}") from exc
    raise ValueError(f"cannot map {what} key {key!r} to the SD1.x LDM layout")


def _vae_tensor(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers: same numbers, 4-D shape.
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def diffusers_to_ldm(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Map SD1.x diffusers state dicts to the single-file LDM (A1111) key layout.

    Args:
        unet_sd: `UNet2DConditionModel` state dict (diffusers names).
        vae_sd: `AutoencoderKL` state dict (diffusers names, linear attention weights).
        text_encoder_sd: `CLIPTextModel` state dict, with or without the `text_model.` prefix
            (transformers 5 saves it without).

    Returns:
        One state dict with `model.diffusion_model.*`, `first_stage_model.*` and
        `cond_stage_model.transformer.text_model.*` keys, as in the original SD1.5 checkpoint,
        including the text encoder's `position_ids` buffer those checkpoints carry. Tensors are
        contiguous, ready for `safetensors.torch.save_file`.

    Raises:
        ValueError: A key does not belong to the SD1.x topology.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unet_sd.items():
        out[_UNET_PREFIX + _rename(key, _UNET_RULES, "UNet")] = tensor.contiguous()
    for key, tensor in vae_sd.items():
        ldm_key = _rename(key, _VAE_RULES, "VAE")
        out[_VAE_PREFIX + ldm_key] = _vae_tensor(ldm_key, tensor).contiguous()
    positions: int | None = None
    for key, tensor in text_encoder_sd.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_embedding.weight":
            positions = tensor.shape[0]
        out[_TEXT_PREFIX + name] = tensor.contiguous()
    position_ids = _TEXT_PREFIX + "embeddings.position_ids"
    if position_ids not in out:
        if positions is None:
            raise ValueError("text encoder state dict has no embeddings.position_embedding.weight")
        out[position_ids] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    return out

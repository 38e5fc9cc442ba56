"""The DINO ViT image tokenizer, with the semantics of transformers 4.35's `ViTModel`.

TripoSR pins transformers 4.35; later releases renamed the modules (breaking the checkpoint keys) and
changed the position-embedding interpolation. This module reproduces 4.35 exactly, with parameter
names equal to the checkpoint keys below `image_tokenizer.model.`.
"""

from __future__ import annotations

import math
from typing import Final

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from kiln_mesh.triposr.config import ViTConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DINOImageTokenizer", "ViTModel", "interpolate_position_embeddings"]

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)


def interpolate_position_embeddings(table: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Resize a stored [1, 1 + G*G, D] position table to a grid_h x grid_w patch grid (transformers 4.35).

    The CLS entry is kept. The G x G grid is resized with bicubic interpolation (a = -0.75,
    align_corners=False) by SCALE FACTORS ((grid + 0.1) / G), not to a size: 4.35 adds 0.1 to dodge a
    float rounding problem and passes scale factors, so torch maps output pixel d to source coordinate
    (d + 0.5) * G / (grid + 0.1) - 0.5 rather than (d + 0.5) * G / grid - 0.5.
    When the patch count already equals the table's and the grid is square, 4.35 returns the table
    unchanged.

    Args:
        table: The stored position embeddings [1, 1 + G*G, D].
        grid_h: Patch rows of the image being encoded.
        grid_w: Patch columns.

    Returns:
        Position embeddings [1, 1 + grid_h * grid_w, D].
    """
    stored = table.shape[1] - 1
    if grid_h * grid_w == stored and grid_h == grid_w:
        return table
    side = math.isqrt(stored)
    if side * side != stored:
        raise ValueError(f"position table of {stored} patch entries is not a square grid")
    cls_entry, grid = table[:, :1], table[:, 1:]
    dim = table.shape[-1]
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid_h + 0.1) / side, (grid_w + 0.1) / side)
    resized = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if resized.shape[-2:] != (grid_h, grid_w):  # floor(G * (grid + 0.1) / G) == grid always holds in practice
        raise RuntimeError(f"position interpolation gave {tuple(resized.shape[-2:])}, expected {(grid_h, grid_w)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((cls_entry, resized), dim=1)


class _PatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixels: Tensor) -> Tensor:
        grid: Tensor = self.projection(pixels)  # [B, D, h, w]
        return grid.flatten(2).transpose(1, 2)  # row-major patches: [B, h*w, D]


class _Embeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.empty(1, config.position_grid**2 + 1, config.hidden_size))
        self.patch_embeddings = _PatchEmbeddings(config)

    def forward(self, pixels: Tensor) -> Tensor:
        batch, _, height, width = pixels.shape
        tokens: Tensor = self.patch_embeddings(pixels)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        # 4.35 derives the grid from the pixel size by floor division (a partial patch is dropped by the conv).
        positions = interpolate_position_embeddings(
            self.position_embeddings, height // self.patch_size, width // self.patch_size
        )
        return tokens + positions


class _SelfAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        # 4.35 writes softmax(q k^T / sqrt(d)) v out by hand; SDPA with its default scale is the same maths.
        out = F.scaled_dot_product_attention(q, k, v)
        batch, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(batch, length, -1)


class _SelfOutput(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.dense(x)
        return out


class _Attention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.attention = _SelfAttention(config)
        self.output = _SelfOutput(config)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.output(self.attention(x))
        return out


class _Intermediate(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # hidden_act "gelu": the exact erf form


class _Output(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.dense(x)
        return out


class ViTLayer(nn.Module):
    """One pre-norm encoder layer: h += attn(LN(h)); h += MLP(LN(h))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor) -> Tensor:
        attended: Tensor = self.attention(self.layernorm_before(h))
        h = h + attended
        mlp: Tensor = self.output(self.intermediate(self.layernorm_after(h)))
        return h + mlp


class _Encoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, h: Tensor) -> Tensor:
        for layer in self.layer:
            h = layer(h)
        return h


class _Pooler(nn.Module):
    """Present because the reference builds `ViTModel` with its pooler (its weights are in the file); never run."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class ViTModel(nn.Module):
    """transformers-4.35 `ViTModel` forward with `interpolate_position_encoding=True`; returns the last hidden state.

    Args:
        config: Encoder hyper-parameters.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = _Pooler(config)

    def forward(self, pixels: Tensor) -> Tensor:
        """Encode normalised pixels [B, 3, H, W] into tokens [B, 1 + (H//p)(W//p), D] (CLS first)."""
        h: Tensor = self.encoder(self.embeddings(pixels))
        out: Tensor = self.layernorm(h)
        return out


class DINOImageTokenizer(nn.Module):
    """The image tokenizer: ImageNet normalisation, then the ViT (checkpoint prefix `image_tokenizer.`).

    Args:
        config: Encoder hyper-parameters.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.model = ViTModel(config)

    def forward(self, pixels: Tensor) -> Tensor:
        """Tokens [B, 1 + patches, D] for images [B, 3, H, W] with values in [0, 1].

        The normalisation constants are not in the checkpoint; they are built here (not as buffers) so a
        model constructed on the meta device needs nothing beyond the checkpoint's tensors.
        """
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        weight = self.model.embeddings.patch_embeddings.projection.weight
        normalised = ((pixels.float() - mean) / std).to(weight.dtype)
        out: Tensor = self.model(normalised)
        return out

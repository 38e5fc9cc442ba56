"""TripoSR's triplane path: learned tokens, the triplane transformer, the upsampler and the point MLP.

Module and parameter names equal the checkpoint keys below `tokenizer.`, `backbone.`,
`post_processor.` and `decoder.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from kiln_mesh.triposr.config import BackboneConfig, DecoderConfig, PostProcessorConfig, TriplaneTokenizerConfig

__all__ = [
    "GEGLU",
    "Attention",
    "BasicTransformerBlock",
    "FeedForward",
    "NeRFMLP",
    "Transformer1D",
    "Triplane1DTokenizer",
    "TriplaneUpsampleNetwork",
]


class Triplane1DTokenizer(nn.Module):
    """Learned triplane tokens [3, C, P, P], flattened plane-major, then row, then column.

    Args:
        config: Plane size and channels.
    """

    def __init__(self, config: TriplaneTokenizerConfig) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.empty(3, config.num_channels, config.plane_size, config.plane_size))

    def forward(self, batch_size: int) -> Tensor:
        """Tokens [B, C, 3 * P * P], channels first; token n = plane * P * P + row * P + column."""
        planes, channels, rows, cols = self.embeddings.shape
        tokens = self.embeddings.permute(1, 0, 2, 3).reshape(1, channels, planes * rows * cols)
        return tokens.expand(batch_size, -1, -1)

    def detokenize(self, tokens: Tensor) -> Tensor:
        """Inverse of `forward`'s flattening: [B, C, 3 * P * P] -> [B, 3, C, P, P]."""
        batch, channels, _ = tokens.shape
        side = self.embeddings.shape[-1]
        return tokens.reshape(batch, channels, 3, side, side).permute(0, 2, 1, 3, 4)


class Attention(nn.Module):
    """Multi-head attention without q/k/v biases and an output projection with bias (`to_out.0`).

    Args:
        query_dim: Width of the queries and of the output.
        context_dim: Width of the keys/values' source (= query_dim for self-attention).
        heads: Number of heads.
        head_dim: Width of one head.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # A list so the key is `to_out.0` (the reference has a dropout at index 1, parameter-free).
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def _split(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(source)), self._split(self.to_v(source))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, no mask
        batch, _, length, _ = out.shape
        projected: Tensor = self.to_out[0](out.transpose(1, 2).reshape(batch, length, -1))
        return projected


class GEGLU(nn.Module):
    """Linear to 2 x hidden, then first half x GELU(second half): the SECOND half is the gate.

    Args:
        dim_in: Input width.
        dim_out: Hidden width (the projection produces twice this).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        projected: Tensor = self.proj(x)
        hidden, gate = projected.chunk(2, dim=-1)
        return hidden * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    """GEGLU (4 x width) then Linear back: keys `net.0.proj` and `net.2` (index 1 is a dropout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = 4 * dim
        self.net = nn.ModuleList([GEGLU(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the image tokens, GEGLU feed-forward.

    Args:
        dim: Token width.
        heads: Attention heads.
        head_dim: Width of one head.
        context_dim: Width of the image tokens.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        # LayerNorm eps 1e-5 (the class default), unlike the backbone's GroupNorm (1e-6).
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        attended: Tensor = self.attn1(self.norm1(h))
        h = h + attended
        attended = self.attn2(self.norm2(h), context)
        h = h + attended
        fed: Tensor = self.ff(self.norm3(h))
        return h + fed


class Transformer1D(nn.Module):
    """The triplane transformer: GroupNorm, proj_in, blocks, proj_out, plus the un-normalised input.

    Args:
        config: The backbone block of the configuration.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        inner = config.inner_dim
        self.norm = nn.GroupNorm(config.norm_num_groups, config.in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(config.in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, config.num_attention_heads, config.attention_head_dim, config.cross_attention_dim
            )
            for _ in range(config.num_layers)
        )
        self.proj_out = nn.Linear(inner, config.in_channels)

    def forward(self, tokens: Tensor, context: Tensor) -> Tensor:
        """Transform tokens [B, C, L] (channels first) attending to image tokens [B, T, D]; returns [B, C, L]."""
        h: Tensor = self.norm(tokens).transpose(1, 2)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).transpose(1, 2)
        return h + tokens  # the residual is the input BEFORE the GroupNorm


class TriplaneUpsampleNetwork(nn.Module):
    """ConvTranspose2d (kernel 2, stride 2) applied to each plane independently.

    Args:
        config: Input and output channels.
    """

    def __init__(self, config: PostProcessorConfig) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(config.in_channels, config.out_channels, kernel_size=2, stride=2)

    def forward(self, planes: Tensor) -> Tensor:
        """[B, 3, Cin, P, P] -> scene codes [B, 3, Cout, 2P, 2P]."""
        batch, count, channels, rows, cols = planes.shape
        out: Tensor = self.upsample(planes.reshape(batch * count, channels, rows, cols))
        return out.reshape(batch, count, *out.shape[1:])


class NeRFMLP(nn.Module):
    """Per-point MLP: Linear layers at Sequential indices 0, 2, ..., with SiLU between.

    Output column 0 is the raw density, columns 1-3 the raw colour.

    Args:
        config: The decoder block of the configuration.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Linear(config.in_channels, config.n_neurons), nn.SiLU()]
        for _ in range(config.n_hidden_layers - 1):
            modules += [nn.Linear(config.n_neurons, config.n_neurons), nn.SiLU()]
        modules.append(nn.Linear(config.n_neurons, 4))
        self.layers = nn.Sequential(*modules)

    def forward(self, features: Tensor) -> Tensor:
        """Raw outputs [N, 4] for features [N, in_channels]."""
        out: Tensor = self.layers(features)
        return out

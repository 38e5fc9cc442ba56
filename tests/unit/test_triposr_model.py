"""Kiln's TripoSR, stage by stage, against independent reference computations.

The references below are written from TripoSR's published architecture, in float64, with
explicit loops and einsums: they share no code with `kiln_mesh.triposr` beyond reading the same
tensors by checkpoint key. Small configurations keep the suite fast; the published configuration
is only ever built on the meta device.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml  # type: ignore[import-untyped]
from omegaconf import OmegaConf
from PIL import Image

from kiln_mesh.testing.tiny_triposr import (
    CONFIG_YAML,
    ELLIPSOID_SEMI_AXES,
    VERSION,
    VIT_CONFIG,
    default_tiny_root,
    ensure_tiny_triposr,
    write_tiny_triposr,
)
from kiln_mesh.triposr import (
    CheckpointMismatch,
    TripoSR,
    TripoSRConfig,
    ViTConfig,
    load_triposr,
    load_triposr_config,
    parse_triposr_config,
    resolve_interpolations,
)
from kiln_mesh.triposr.backbone import GEGLU, BasicTransformerBlock, Transformer1D, TriplaneUpsampleNetwork
from kiln_mesh.triposr.config import PUBLISHED_CONFIG_YAML as PUBLISHED_CONFIG
from kiln_mesh.triposr.config import BackboneConfig, PostProcessorConfig
from kiln_mesh.triposr.vit import ViTLayer, interpolate_position_embeddings

REPO_ROOT = Path(__file__).resolve().parents[2]
#: SHA-256 of the published checkpoint's state-dict layout: one "key<TAB>shape" line per tensor (shape as a
#: JSON list), in the checkpoint's order, joined by newlines. Taken from a listing of the real
#: `model.ckpt`, so the keys spelled out below are checked against the release, not only against themselves.
PUBLISHED_LAYOUT_SHA256 = "234605e57388f9710617ae6ad46a853ebf3376d62ef9364309d93e58f249c06b"
PUBLISHED_PARAMETERS = 419_275_628


Sd = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_triposr(tmp_path_factory.mktemp("tiny-triposr"))


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> TripoSR:
    return load_triposr(tiny_folder)


@pytest.fixture(scope="module")
def tiny_sd(tiny_folder: Path) -> Sd:
    loaded = torch.load(tiny_folder / "model.ckpt", weights_only=True)
    return {k: v.double() for k, v in loaded.items()}


@pytest.fixture
def published_folder(tmp_path: Path) -> Path:
    (tmp_path / "config.yaml").write_text(PUBLISHED_CONFIG, encoding="utf-8")
    return tmp_path


def grid_points(resolution: int, radius: float) -> torch.Tensor:
    """The extract_mesh grid: linspace(0, 1) per axis mapped to [-r, r], i fastest-varying last."""
    t = torch.linspace(0, 1, resolution)
    ijk = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), dim=-1).reshape(-1, 3)
    return ijk * 2 * radius - radius


def randomise(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


# ---------------------------------------------------------------------------------------------------------
# Independent references (float64)


def ref_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_linear(x: torch.Tensor, sd: Sd, name: str) -> torch.Tensor:
    out = torch.einsum("...i,oi->...o", x, sd[f"{name}.weight"])
    bias = sd.get(f"{name}.bias")
    return out if bias is None else out + bias


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, for [L, H*d] inputs of ONE sample; returns [Lq, H*d]."""
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(t.shape[0], heads, d) for t in (q, k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("hqk,khd->qhd", weights, v).reshape(q.shape[0], heads * d)


def cubic_kernel(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, src_per_dst: float) -> torch.Tensor:
    """Rows: output samples; source coordinate (d + 0.5) * src_per_dst - 0.5, taps clamped to the edge."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        src = (d + 0.5) * src_per_dst - 0.5
        i0 = math.floor(src)
        t = src - i0
        for offset in range(-1, 3):
            m[d, min(max(i0 + offset, 0), n_in - 1)] += cubic_kernel(t - offset)
    return m


def ref_positions(table: torch.Tensor, grid: int, *, by_size: bool = False) -> torch.Tensor:
    """transformers 4.35 (scale factor (grid + 0.1) / G) or, with by_size, the later size-based variant."""
    side = math.isqrt(table.shape[1] - 1)
    if grid == side:
        return table
    src_per_dst = side / grid if by_size else side / (grid + 0.1)
    m = bicubic_matrix(side, grid, src_per_dst)
    planes = table[0, 1:].reshape(side, side, -1).permute(2, 0, 1)  # [D, G, G]
    resized = torch.einsum("ri,dij,cj->rcd", m, planes, m).reshape(grid * grid, -1)
    return torch.cat((table[:, :1], resized[None]), dim=1)


def ref_vit_layer(h: torch.Tensor, sd: Sd, p: str, heads: int, eps: float) -> torch.Tensor:
    a = ref_layernorm(h, sd[f"{p}.layernorm_before.weight"], sd[f"{p}.layernorm_before.bias"], eps)
    q, k, v = (ref_linear(a, sd, f"{p}.attention.attention.{n}") for n in ("query", "key", "value"))
    h = h + ref_linear(ref_attention(q, k, v, heads), sd, f"{p}.attention.output.dense")
    a = ref_layernorm(h, sd[f"{p}.layernorm_after.weight"], sd[f"{p}.layernorm_after.bias"], eps)
    return h + ref_linear(ref_gelu(ref_linear(a, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense")


def ref_vit(pixels: torch.Tensor, sd: Sd, vit: ViTConfig) -> torch.Tensor:
    """Image tokenizer for ONE image [3, S, S] in [0, 1]: returns [1 + patches, D]."""
    p = "image_tokenizer.model."
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
    x = (pixels.double() - mean) / std
    ps, side = vit.patch_size, pixels.shape[-1] // vit.patch_size
    patches = x.reshape(3, side, ps, side, ps).permute(1, 3, 0, 2, 4).reshape(side * side, 3 * ps * ps)
    w = sd[f"{p}embeddings.patch_embeddings.projection.weight"].reshape(vit.hidden_size, -1)
    tokens = patches @ w.T + sd[f"{p}embeddings.patch_embeddings.projection.bias"]  # row-major patch order
    tokens = torch.cat((sd[f"{p}embeddings.cls_token"][0], tokens))
    h = tokens + ref_positions(sd[f"{p}embeddings.position_embeddings"], side)[0]
    for i in range(vit.num_hidden_layers):
        h = ref_vit_layer(h, sd, f"{p}encoder.layer.{i}", vit.num_attention_heads, vit.layer_norm_eps)
    return ref_layernorm(h, sd[f"{p}layernorm.weight"], sd[f"{p}layernorm.bias"], vit.layer_norm_eps)


def ref_block(h: torch.Tensor, ctx: torch.Tensor, sd: Sd, p: str, heads: int) -> torch.Tensor:
    """BasicTransformerBlock for one sample, h [L, C], ctx [T, D]."""

    def attn(a: torch.Tensor, source: torch.Tensor, name: str) -> torch.Tensor:
        q, k, v = (ref_linear(t, sd, f"{p}.{name}.to_{n}") for t, n in ((a, "q"), (source, "k"), (source, "v")))
        return ref_linear(ref_attention(q, k, v, heads), sd, f"{p}.{name}.to_out.0")

    a = ref_layernorm(h, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-5)
    h = h + attn(a, a, "attn1")
    a = ref_layernorm(h, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-5)
    h = h + attn(a, ctx, "attn2")
    a = ref_layernorm(h, sd[f"{p}.norm3.weight"], sd[f"{p}.norm3.bias"], 1e-5)
    u = ref_linear(a, sd, f"{p}.ff.net.0.proj")
    half = u.shape[-1] // 2
    return h + ref_linear(u[:, :half] * ref_gelu(u[:, half:]), sd, f"{p}.ff.net.2")


def ref_backbone(
    x0: torch.Tensor, ctx: torch.Tensor, sd: Sd, cfg: BackboneConfig, p: str = "backbone."
) -> torch.Tensor:
    """Transformer1D for one sample, x0 [C, L] channels first."""
    channels, length = x0.shape
    groups = x0.reshape(cfg.norm_num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    var = ((groups - mean) ** 2).mean(-1, keepdim=True)
    normed = ((groups - mean) / torch.sqrt(var + 1e-6)).reshape(channels, length)
    normed = normed * sd[f"{p}norm.weight"][:, None] + sd[f"{p}norm.bias"][:, None]
    h = ref_linear(normed.T, sd, f"{p}proj_in")
    for i in range(cfg.num_layers):
        h = ref_block(h, ctx, sd, f"{p}transformer_blocks.{i}", cfg.num_attention_heads)
    return ref_linear(h, sd, f"{p}proj_out").T + x0


def ref_upsample(planes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """out[o, 2i+di, 2j+dj] = b[o] + sum_c in[c, i, j] W[c, o, di, dj], one plane [C, P, P]."""
    _, rows, cols = planes.shape
    out = torch.empty(weight.shape[1], 2 * rows, 2 * cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            for di in range(2):
                for dj in range(2):
                    out[:, 2 * i + di, 2 * j + dj] = bias + torch.einsum(
                        "c,co->o", planes[:, i, j], weight[:, :, di, dj]
                    )
    return out


def ref_sample_plane(plane: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup with zero padding: gx indexes columns, gy rows; pixel = ((g + 1) * size - 1) / 2."""
    _, rows, cols = plane.shape
    px, py = ((gx + 1) * cols - 1) / 2, ((gy + 1) * rows - 1) / 2
    x0, y0 = torch.floor(px).long(), torch.floor(py).long()
    out = torch.zeros(gx.shape[0], plane.shape[0], dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - (px - xi).abs()) * (1 - (py - yi).abs())
            inside = (xi >= 0) & (xi < cols) & (yi >= 0) & (yi < rows)
            values = plane[:, yi.clamp(0, rows - 1), xi.clamp(0, cols - 1)].T  # [N, C]
            out += torch.where(inside[:, None], w[:, None] * values, 0.0)
    return out


def ref_features(code: torch.Tensor, points: torch.Tensor, radius: float) -> torch.Tensor:
    u = (points.double() + radius) / (2 * radius) * 2 - 1
    x, y, z = u.unbind(-1)
    return torch.cat(
        (ref_sample_plane(code[0], x, y), ref_sample_plane(code[1], x, z), ref_sample_plane(code[2], y, z)), dim=-1
    )


def ref_mlp(features: torch.Tensor, sd: Sd, n_linear: int) -> torch.Tensor:
    h = features
    for i in range(n_linear):
        h = ref_linear(h, sd, f"decoder.layers.{2 * i}")
        if i < n_linear - 1:
            h = h * torch.sigmoid(h)
    return h


# ---------------------------------------------------------------------------------------------------------
# Configuration


def test_interpolation_whole_value_keeps_type_and_string_embeds_text() -> None:
    tree = {"a": {"b": 1024, "r": 0.87}, "c": "${a.b}", "d": "w${a.b}-${a.r}", "e": "${c}"}
    out = resolve_interpolations(tree)
    assert out["c"] == 1024 and isinstance(out["c"], int)
    assert out["d"] == "w1024-0.87"
    assert out["e"] == 1024  # chained through another interpolation
    assert tree["c"] == "${a.b}"  # the input is not modified


def test_interpolation_nested_relative_lists_and_escapes() -> None:
    tree = {
        "which": "b",
        "a": {"b": 7, "x": "${a.${which}}", "sib": "${.b}", "up": "${..which}"},
        "items": [10, 20, "${items.0}"],
        "lit": "\\${a.b}",
        "deep": {"one": {"two": "${a.x}"}},
        "alias": "${a}",
        "through": "${alias.b}",
    }
    out = resolve_interpolations(tree)
    assert out["a"] == {"b": 7, "x": 7, "sib": 7, "up": "b"}
    assert out["items"] == [10, 20, 10]
    assert out["lit"] == "${a.b}"
    assert out["deep"]["one"]["two"] == 7
    assert out["alias"] == out["a"]
    assert out["through"] == 7


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"a": "${missing.key}"}, "^a: Interpolation key 'missing.key' not found"),
        ({"a": {"b": 1}, "c": "${a.x}"}, "^c: Interpolation key 'a.x' not found"),
        ({"w": "y", "a": {"b": 1}, "c": {"d": "${a.${w}}"}}, "^c.d: Interpolation key 'a.y' not found"),
        ({"a": "${b}", "b": "${a}"}, "^a: Recursive interpolation"),
        ({"a": "${oc.env:HOME}"}, "^a: .* calls a resolver.*no resolvers"),
        ({"a": {"b": ["x ${oc.env:HOME}"]}}, "^a.b.0: .* calls a resolver"),
        ({"a": "${b"}, "^a: malformed interpolation"),
        ({"a": "${...x}"}, "^a: .*'...x'"),
    ],
)
def test_interpolation_errors(tree: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_interpolations(tree)


def test_escaped_resolver_is_literal_text() -> None:
    assert resolve_interpolations({"a": "\\${oc.env:HOME}"}) == {"a": "${oc.env:HOME}"}
    # As OmegaConf.load returns it: the escape survives the copy instead of being resolved twice.
    loaded = OmegaConf.create({"a": "\\${b}", "b": 1, "c": {"d": "\\${b}"}})
    assert resolve_interpolations(loaded) == {"a": "${b}", "b": 1, "c": {"d": "${b}"}}


def test_published_config(published_folder: Path) -> None:
    config = load_triposr_config(published_folder)
    assert config.cond_image_size == 512
    assert config.backbone.in_channels == 1024  # resolved from ${tokenizer.num_channels}
    assert (config.backbone.num_attention_heads, config.backbone.attention_head_dim) == (16, 64)
    assert (config.backbone.num_layers, config.backbone.cross_attention_dim) == (16, 768)
    assert (config.tokenizer.plane_size, config.tokenizer.num_channels) == (32, 1024)
    assert (config.post_processor.in_channels, config.post_processor.out_channels) == (1024, 40)
    assert (config.decoder.in_channels, config.decoder.n_neurons, config.decoder.n_hidden_layers) == (120, 64, 9)
    assert config.decoder.activation == "silu"
    r = config.renderer
    assert (r.radius, r.feature_reduction, r.density_activation, r.density_bias) == (0.87, "concat", "exp", -1.0)
    assert r.num_samples_per_ray == 128
    vit = config.image_tokenizer.vit
    assert config.image_tokenizer.pretrained_model_name_or_path == "facebook/dino-vitb16"
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (vit.image_size, vit.patch_size, vit.layer_norm_eps, vit.hidden_act, vit.qkv_bias) == (
        224,
        16,
        1e-12,
        "gelu",
        True,
    )
    assert config.scene_code_shape == (3, 40, 64, 64)


def _published_with(old: str, new: str) -> object:
    text = PUBLISHED_CONFIG.replace(old, new)
    assert text != PUBLISHED_CONFIG
    return yaml.safe_load(text)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "feature_reduction: concat",
            "feature_reduction: mean",
            "renderer.feature_reduction = 'mean' is not supported",
        ),
        ("density_activation: exp", "density_activation: trunc_exp", "density_activation = 'trunc_exp'"),
        ("activation: silu", "activation: relu", "decoder.activation = 'relu'"),
        ("  num_layers: 16\n", "  num_layers: 16\n  attention_bias: true\n", "backbone.attention_bias"),
        ("  num_layers: 16\n", "  num_layers: 16\n  colour: red\n", "unknown key.*backbone: colour"),
        ("in_channels: 120", "in_channels: 121", "decoder.in_channels 121"),
        ("cross_attention_dim: 768", "cross_attention_dim: 512", "cross_attention_dim 512"),
        (
            "${tokenizer.num_channels}",
            "${tokenizer.channels}",
            "backbone.in_channels: Interpolation key 'tokenizer.channels' not found",
        ),
        ("plane_size: 32", "plane_size: thirty", "tokenizer.plane_size: expected an integer"),
        ("radius: 0.87", "radius: -0.87", "renderer.radius: expected a positive number"),
        ('"facebook/dino-vitb16"', '"facebook/dino-vits8"', "no built-in preset"),
        ("Transformer1D\n", "Transformer2D\n", "backbone_cls"),
        ("  num_layers: 16\n", "  num_layers: true\n", "backbone.num_layers: expected a number, got True"),
        (
            "  num_layers: 16\n",
            "  num_layers: 16\n  norm_type: 3\n  dropout: .nan\n",
            r"backbone.norm_type = 3 is not supported.*; backbone.dropout: .*finite",
        ),
        ("  num_layers: 16\n", "  num_layers: 16\n  vit: 1\n  b: 2\n  a: 3\n", "unknown key.*backbone: a, b, vit"),
        ("  num_samples_per_ray: 128\n", "", "missing key renderer.num_samples_per_ray"),
    ],
)
def test_config_rejects_unsupported_values(old: str, new: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_triposr_config(_published_with(old, new))


def test_config_file_errors_name_the_file_and_key(published_folder: Path) -> None:
    path = published_folder / "config.yaml"
    path.write_text(PUBLISHED_CONFIG.replace("num_samples_per_ray: 128", "num_samples_per_ray: x"))
    message = f"^{re.escape(str(path))}: renderer.num_samples_per_ray: expected an integer, got 'x'$"
    with pytest.raises(ValueError, match=message):
        load_triposr_config(published_folder)
    path.write_text(PUBLISHED_CONFIG.replace("${tokenizer.num_channels}", "${oc.env:HOME}"))
    with pytest.raises(ValueError, match=r"backbone.in_channels: .* calls a resolver"):
        load_triposr_config(published_folder)
    path.write_text(PUBLISHED_CONFIG + "renderer: {}\n")
    with pytest.raises(ValueError, match=r"(?s)not valid YAML.*duplicate key renderer"):
        load_triposr_config(published_folder)


def test_config_accepts_yaml11_exponent_strings() -> None:
    # PyYAML reads 1e-0 without a dot as a string; numeric fields accept it, as OmegaConf would.
    config = parse_triposr_config(_published_with("density_bias: -1.0", "density_bias: -1e-0"))
    assert config.renderer.density_bias == -1.0


def test_vit_config_json_overrides_the_preset(published_folder: Path) -> None:
    (published_folder / "vit_config.json").write_text(json.dumps({"layer_norm_eps": 1e-6, "transformers_version": "x"}))
    vit = load_triposr_config(published_folder).image_tokenizer.vit
    assert vit.layer_norm_eps == 1e-6
    assert (vit.hidden_size, vit.num_hidden_layers, vit.image_size) == (768, 12, 224)  # the rest from the preset
    (published_folder / "vit_config.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        load_triposr_config(published_folder)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        load_triposr_config(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Image tokenizer


def test_position_interpolation_uses_scale_factors() -> None:
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(1, 1 + 3 * 3, 5, generator=generator, dtype=torch.float64)
    got = interpolate_position_embeddings(table, 7, 7)
    assert got.shape == (1, 50, 5)
    torch.testing.assert_close(got[:, 0], table[:, 0], rtol=0, atol=0)  # CLS untouched
    torch.testing.assert_close(got, ref_positions(table, 7), rtol=1e-7, atol=1e-9)
    # The size-based variant (later transformers) is a different function: the +0.1 is not noise.
    by_size = ref_positions(table, 7, by_size=True)
    assert (got - by_size).abs().max() > 0.02
    explicit_size = F.interpolate(
        table[:, 1:].reshape(1, 3, 3, 5).permute(0, 3, 1, 2), size=(7, 7), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(by_size[0, 1:], explicit_size.permute(0, 2, 3, 1).reshape(49, 5))
    # Same grid as stored: 4.35 returns the table as is (a scale factor of 3.1/3 would move it).
    assert interpolate_position_embeddings(table, 3, 3) is table


def test_vit_layer_matches_a_hand_written_pre_norm_block() -> None:
    vit = ViTConfig(
        hidden_size=12, num_hidden_layers=1, num_attention_heads=3, intermediate_size=20, image_size=32, patch_size=16
    )
    layer = ViTLayer(vit).double()
    randomise(layer, seed=1)
    h = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sd = {f"l.{k}": v for k, v in layer.state_dict().items()}
    expected = torch.stack([ref_vit_layer(h[b], sd, "l", 3, vit.layer_norm_eps) for b in range(2)])
    torch.testing.assert_close(layer(h), expected, rtol=1e-10, atol=1e-10)


def test_image_tokenizer_matches_reference(tiny: TripoSR, tiny_sd: Sd) -> None:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = tiny.image_tokenizer(pixels)
    vit = tiny.config.image_tokenizer.vit
    assert got.shape == (2, 1 + 16, 32)  # 64 px / 16 = 4 x 4 patches, table made for 2 x 2: interpolated
    for b in range(2):
        torch.testing.assert_close(got[b].double(), ref_vit(pixels[b], tiny_sd, vit), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Triplane transformer and upsampler


def test_geglu_gates_with_the_second_half() -> None:
    geglu = GEGLU(4, 3).double()
    randomise(geglu, seed=4)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u = x @ geglu.proj.weight.T + geglu.proj.bias
    torch.testing.assert_close(geglu(x), u[:, :3] * ref_gelu(u[:, 3:]))
    assert not torch.allclose(geglu(x), ref_gelu(u[:, :3]) * u[:, 3:])


def _tiny_backbone_config() -> BackboneConfig:
    return BackboneConfig(
        in_channels=8,
        num_attention_heads=2,
        attention_head_dim=3,
        num_layers=2,
        cross_attention_dim=5,
        norm_num_groups=4,
    )


def test_transformer_block_and_backbone_match_reference() -> None:
    cfg = _tiny_backbone_config()
    backbone = Transformer1D(cfg).double()
    randomise(backbone, seed=6)
    generator = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 8, 12, generator=generator, dtype=torch.float64) * 3 + 1
    ctx = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    got = backbone(x0, ctx)
    for b in range(2):
        torch.testing.assert_close(got[b], ref_backbone(x0[b], ctx[b], sd, cfg), rtol=1e-10, atol=1e-10)
    block = backbone.transformer_blocks[0]
    assert isinstance(block, BasicTransformerBlock)
    h = torch.randn(12, 6, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        block(h[None], ctx[:1])[0], ref_block(h, ctx[0], sd, "backbone.transformer_blocks.0", 2), rtol=1e-10, atol=1e-10
    )


def test_backbone_residual_is_the_unnormalised_input() -> None:
    backbone = Transformer1D(_tiny_backbone_config()).double()
    randomise(backbone, seed=8)
    with torch.no_grad():
        backbone.proj_out.weight.zero_()
        backbone.proj_out.bias.zero_()
    x0 = torch.randn(1, 8, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 5 + 2
    ctx = torch.randn(1, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(backbone(x0, ctx), x0, rtol=0, atol=0)  # not GroupNorm(x0)


def test_transposed_convolution_detokenisation_formula() -> None:
    net = TriplaneUpsampleNetwork(PostProcessorConfig(in_channels=5, out_channels=3)).double()
    randomise(net, seed=10)
    planes = torch.randn(2, 3, 5, 4, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    got = net(planes)
    assert got.shape == (2, 3, 3, 8, 8)
    w, b = net.upsample.weight, net.upsample.bias
    for batch in range(2):
        for plane in range(3):
            torch.testing.assert_close(got[batch, plane], ref_upsample(planes[batch, plane], w, b))


def test_tokenizer_order_is_plane_row_column(tiny: TripoSR) -> None:
    tokens = tiny.tokenizer(2)
    emb = tiny.tokenizer.embeddings  # [3, C, P, P]
    side = emb.shape[-1]
    for plane, row, col in ((0, 0, 1), (1, 2, 3), (2, 7, 5)):
        n = plane * side * side + row * side + col
        torch.testing.assert_close(tokens[1, :, n], emb[plane, :, row, col], rtol=0, atol=0)
    torch.testing.assert_close(tiny.tokenizer.detokenize(tokens)[0], emb, rtol=0, atol=0)


def test_encode_matches_the_composed_reference(tiny: TripoSR, tiny_sd: Sd) -> None:
    image = Image.fromarray(np.random.default_rng(12).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    pixels = tiny.preprocess([image])
    code = tiny.encode(pixels)
    cfg = tiny.config
    assert code.shape == (1, *cfg.scene_code_shape) == (1, 3, 8, 16, 16)
    ctx = ref_vit(pixels[0], tiny_sd, cfg.image_tokenizer.vit)
    emb = tiny_sd["tokenizer.embeddings"]
    x0 = emb.permute(1, 0, 2, 3).reshape(emb.shape[1], -1)
    planes = ref_backbone(x0, ctx, tiny_sd, cfg.backbone).reshape(emb.shape[1], 3, 8, 8).permute(1, 0, 2, 3)
    w, b = tiny_sd["post_processor.upsample.weight"], tiny_sd["post_processor.upsample.bias"]
    expected = torch.stack([ref_upsample(planes[p], w, b) for p in range(3)])
    scale = expected.abs().max()
    assert (code[0].double() - expected).abs().max() / scale < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_scales_and_resizes_with_antialias(tiny: TripoSR) -> None:
    array = np.random.default_rng(13).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    same = tiny.preprocess([Image.fromarray(array)])
    torch.testing.assert_close(same[0], torch.from_numpy(array).permute(2, 0, 1).float() / 255, rtol=0, atol=1e-7)
    big = np.random.default_rng(14).integers(0, 256, (200, 150, 3), dtype=np.uint8)
    got = tiny.preprocess([Image.fromarray(big)])
    x = torch.from_numpy(big).permute(2, 0, 1)[None].float() / 255
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plain = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=False)
    assert (got - plain).abs().max() > 0.05
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        tiny.preprocess([Image.new("RGBA", (8, 8))])
    with pytest.raises(ValueError, match=r"expected pixels \[B, 3, 64, 64\]"):
        tiny.encode(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------------------
# Triplane query and activations


def _texel_centre(index: int, size: int, radius: float) -> float:
    # ((g + 1) * size - 1) / 2 = index  <=>  g = (2 * index + 1) / size - 1; world = g * radius.
    return ((2 * index + 1) / size - 1) * radius


def test_point_at_a_texel_centre_reads_that_texel(tiny: TripoSR) -> None:
    code = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(15))
    r = tiny.radius
    xi, yi, zi = 3, 11, 6
    point = torch.tensor([[_texel_centre(xi, 16, r), _texel_centre(yi, 16, r), _texel_centre(zi, 16, r)]])
    features = tiny.triplane_features(code, point)[0]
    expected = torch.cat((code[0, :, yi, xi], code[1, :, zi, xi], code[2, :, zi, yi]))
    torch.testing.assert_close(features, expected, rtol=0, atol=2e-6)


def test_plane_axis_assignment() -> None:
    """One distinctive value per plane: plane 0 x-cols/y-rows, plane 1 x-cols/z-rows, plane 2 y-cols/z-rows."""
    config = load_tiny_config()
    model = TripoSR(config)
    side, c, r = 16, 8, config.renderer.radius
    code = torch.zeros(3, c, side, side)
    a, b, d = 2, 9, 13  # x, y, z texel indices, all different
    code[0, 1, b, a] = 10.0  # row = y, column = x
    code[1, 2, d, a] = 20.0  # row = z, column = x
    code[2, 3, d, b] = 30.0  # row = z, column = y
    point = torch.tensor([[_texel_centre(a, side, r), _texel_centre(b, side, r), _texel_centre(d, side, r)]])
    features = model.triplane_features(code, point)[0]
    assert features[1] == pytest.approx(10.0, abs=1e-4)
    assert features[c + 2] == pytest.approx(20.0, abs=1e-4)
    assert features[2 * c + 3] == pytest.approx(30.0, abs=1e-4)
    assert int((features.abs() > 1e-4).sum()) == 3
    # Any permutation of the coordinates misses all three texels.
    for perm in ((1, 0, 2), (0, 2, 1), (2, 1, 0)):
        assert model.triplane_features(code, point[:, perm]).abs().max() < 1e-4


def test_query_bilinear_and_outside_points_match_reference(tiny: TripoSR) -> None:
    generator = torch.Generator().manual_seed(16)
    code = torch.randn(3, 8, 16, 16, generator=generator)
    r = tiny.radius
    points = (torch.rand(500, 3, generator=generator) * 2 - 1) * r * 1.2  # some just outside the cube
    got = tiny.triplane_features(code, points)
    torch.testing.assert_close(got.double(), ref_features(code.double(), points, r), rtol=1e-5, atol=1e-5)
    far = torch.tensor([[2.0, 2.0, 2.0], [-1.5, 0.95, -3.0]])
    assert tiny.triplane_features(code, far).abs().max() == 0
    only_x_out = torch.tensor([[1.5, 0.1, -0.2]])
    features = tiny.triplane_features(code, only_x_out)[0]
    assert features[:16].abs().max() == 0  # planes 0 and 1 need x
    assert features[16:].abs().max() > 0  # plane 2 is (y, z)


def test_decoder_activations(tiny_folder: Path) -> None:
    model = load_triposr(tiny_folder)
    last = model.decoder.layers[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([3.5, -2.0, 0.0, 1.5]))
    code = torch.randn(3, 8, 16, 16)
    density, rgb = model.query(code, torch.zeros(4, 3))
    torch.testing.assert_close(density, torch.full((4,), math.exp(3.5 - 1.0)))  # exp(raw + density_bias)
    expected_rgb = torch.sigmoid(torch.tensor([-2.0, 0.0, 1.5])).expand(4, 3)
    torch.testing.assert_close(rgb, expected_rgb)


def test_query_matches_reference_mlp(tiny: TripoSR, tiny_sd: Sd) -> None:
    generator = torch.Generator().manual_seed(17)
    code = torch.randn(3, 8, 16, 16, generator=generator)
    points = (torch.rand(300, 3, generator=generator) * 2 - 1) * 0.87
    density, rgb = tiny.query(code, points)
    assert density.dtype == rgb.dtype == torch.float32 and rgb.shape == (300, 3)
    raw = ref_mlp(ref_features(code.double(), points, 0.87), tiny_sd, 3)
    torch.testing.assert_close(density.double(), torch.exp(raw[:, 0] - 1.0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rgb.double(), torch.sigmoid(raw[:, 1:]), rtol=1e-5, atol=1e-6)
    assert torch.equal(tiny.query_density(code, points), density)
    empty_density, empty_rgb = tiny.query(code, torch.zeros(0, 3))
    assert empty_density.shape == (0,) and empty_rgb.shape == (0, 3)


def test_bfloat16_weights_query_returns_float32(tiny_folder: Path, tiny: TripoSR) -> None:
    model = load_triposr(tiny_folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    code = model.encode(model.preprocess([image]).to(torch.bfloat16))[0]
    assert code.dtype == torch.bfloat16
    points = grid_points(8, model.radius)
    density, rgb = model.query(code, points)
    assert density.dtype == rgb.dtype == torch.float32
    ref_density, ref_rgb = tiny.query(tiny.encode(tiny.preprocess([image]))[0], points)
    assert torch.corrcoef(torch.stack((density.log(), ref_density.log())))[0, 1] > 0.99
    assert (rgb - ref_rgb).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------------------
# Checkpoint loading


def _tiny_copy(tiny_folder: Path, dest: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    dest.mkdir()
    for name in ("config.yaml", "vit_config.json"):
        (dest / name).write_bytes((tiny_folder / name).read_bytes())
    state = torch.load(tiny_folder / "model.ckpt", weights_only=True)
    edit(state)
    torch.save(state, dest / "model.ckpt")
    return dest


def test_missing_key_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    folder = _tiny_copy(tiny_folder, tmp_path / "m", lambda s: s.pop("backbone.proj_in.bias"))
    with pytest.raises(CheckpointMismatch, match=r"1 missing key\(s\): backbone.proj_in.bias") as info:
        load_triposr(folder)
    assert info.value.missing == ["backbone.proj_in.bias"] and not info.value.unexpected


def test_unexpected_key_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    folder = _tiny_copy(tiny_folder, tmp_path / "u", lambda s: s.update({"image_tokenizer.image_mean": torch.zeros(3)}))
    with pytest.raises(CheckpointMismatch, match=r"1 unexpected key\(s\): image_tokenizer.image_mean"):
        load_triposr(folder)


def test_shape_mismatch_is_named_with_both_shapes(tiny_folder: Path, tmp_path: Path) -> None:
    folder = _tiny_copy(
        tiny_folder, tmp_path / "s", lambda s: s.update({"decoder.layers.4.weight": torch.zeros(5, 16)})
    )
    with pytest.raises(CheckpointMismatch, match=r"decoder.layers.4.weight \(checkpoint \[5, 16\], model \[4, 16\]\)"):
        load_triposr(folder)


def test_wrapped_and_malformed_checkpoints(tiny_folder: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_folder / "model.ckpt", weights_only=True)
    wrapped = _tiny_copy(tiny_folder, tmp_path / "w", lambda s: None)
    torch.save({"state_dict": state, "epoch": 3}, wrapped / "model.ckpt")
    assert load_triposr(wrapped).tokenizer.embeddings.shape == (3, 64, 8, 8)
    torch.save([1, 2, 3], wrapped / "model.ckpt")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_triposr(wrapped)
    torch.save({"a": torch.zeros(1), "b": 2}, wrapped / "model.ckpt")
    with pytest.raises(ValueError, match="flat mapping"):
        load_triposr(wrapped)
    (wrapped / "model.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors or model.ckpt"):
        load_triposr(wrapped)


def test_safetensors_and_ckpt_load_identical_models(tiny_folder: Path, tmp_path: Path) -> None:
    st_folder = write_tiny_triposr(tmp_path / "st", fmt="safetensors")
    assert not (st_folder / "model.ckpt").exists()
    a, b = load_triposr(tiny_folder), load_triposr(st_folder)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pixels = a.preprocess([Image.new("RGB", (64, 64), (90, 160, 30))])
    torch.testing.assert_close(a.encode(pixels), b.encode(pixels), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in b.parameters()) and not b.training


def test_published_model_structure_and_parameter_count(published_folder: Path) -> None:
    config = load_triposr_config(published_folder)
    with torch.device("meta"):
        model = TripoSR(config)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = published_state_dict_shapes(config)
    assert got == expected and list(got) == list(expected)
    assert len(got) == 549
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS
    layout = "\n".join(f"{key}\t{json.dumps(shape)}" for key, shape in got.items())
    assert hashlib.sha256(layout.encode()).hexdigest() == PUBLISHED_LAYOUT_SHA256


def test_load_triposr_on_published_config_checks_every_key(published_folder: Path) -> None:
    torch.save(collections.OrderedDict(), published_folder / "model.ckpt")
    with pytest.raises(CheckpointMismatch, match=r"549 missing key\(s\): .*\.\.\. and 539 more") as info:
        load_triposr(published_folder)
    assert len(info.value.missing) == 549


def published_state_dict_shapes(config: TripoSRConfig) -> dict[str, list[int]]:
    """The 549 keys of the published checkpoint, spelled out from their patterns, in module registration order."""
    assert config.tokenizer.num_channels == 1024
    out: dict[str, list[int]] = {}
    v = "image_tokenizer.model."
    out[f"{v}embeddings.cls_token"] = [1, 1, 768]
    out[f"{v}embeddings.position_embeddings"] = [1, 197, 768]
    out[f"{v}embeddings.patch_embeddings.projection.weight"] = [768, 3, 16, 16]
    out[f"{v}embeddings.patch_embeddings.projection.bias"] = [768]
    for n in range(12):
        p = f"{v}encoder.layer.{n}."
        for name in ("query", "key", "value"):
            out[f"{p}attention.attention.{name}.weight"] = [768, 768]
            out[f"{p}attention.attention.{name}.bias"] = [768]
        out[f"{p}attention.output.dense.weight"] = [768, 768]
        out[f"{p}attention.output.dense.bias"] = [768]
        out[f"{p}intermediate.dense.weight"] = [3072, 768]
        out[f"{p}intermediate.dense.bias"] = [3072]
        out[f"{p}output.dense.weight"] = [768, 3072]
        out[f"{p}output.dense.bias"] = [768]
        for name in ("layernorm_before", "layernorm_after"):
            out[f"{p}{name}.weight"] = [768]
            out[f"{p}{name}.bias"] = [768]
    out[f"{v}layernorm.weight"] = out[f"{v}layernorm.bias"] = [768]
    out[f"{v}pooler.dense.weight"], out[f"{v}pooler.dense.bias"] = [768, 768], [768]
    out["tokenizer.embeddings"] = [3, 1024, 32, 32]
    out["backbone.norm.weight"] = out["backbone.norm.bias"] = [1024]
    out["backbone.proj_in.weight"], out["backbone.proj_in.bias"] = [1024, 1024], [1024]
    for blk in range(16):
        p = f"backbone.transformer_blocks.{blk}."
        for norm, attn, kv in (("norm1", "attn1", 1024), ("norm2", "attn2", 768)):
            out[f"{p}{norm}.weight"] = out[f"{p}{norm}.bias"] = [1024]
            out[f"{p}{attn}.to_q.weight"] = [1024, 1024]
            out[f"{p}{attn}.to_k.weight"] = out[f"{p}{attn}.to_v.weight"] = [1024, kv]
            out[f"{p}{attn}.to_out.0.weight"], out[f"{p}{attn}.to_out.0.bias"] = [1024, 1024], [1024]
        out[f"{p}norm3.weight"] = out[f"{p}norm3.bias"] = [1024]
        out[f"{p}ff.net.0.proj.weight"], out[f"{p}ff.net.0.proj.bias"] = [8192, 1024], [8192]
        out[f"{p}ff.net.2.weight"], out[f"{p}ff.net.2.bias"] = [1024, 4096], [1024]
    out["backbone.proj_out.weight"], out["backbone.proj_out.bias"] = [1024, 1024], [1024]
    out["post_processor.upsample.weight"], out["post_processor.upsample.bias"] = [1024, 40, 2, 2], [40]
    for i in range(10):  # Linear at Sequential indices 0, 2, ..., 18
        fan_in = 120 if i == 0 else 64
        width = 4 if i == 9 else 64
        out[f"decoder.layers.{2 * i}.weight"], out[f"decoder.layers.{2 * i}.bias"] = [width, fan_in], [width]
    return out


# ---------------------------------------------------------------------------------------------------------
# The tiny checkpoint


def load_tiny_config() -> TripoSRConfig:
    return parse_triposr_config(yaml.safe_load(CONFIG_YAML), vit_overrides=VIT_CONFIG)


def test_tiny_config_shape(tiny: TripoSR, tiny_folder: Path) -> None:
    text = (tiny_folder / "config.yaml").read_text()
    assert "in_channels: ${tokenizer.num_channels}" in text
    cfg = tiny.config
    assert cfg.cond_image_size == 64 and cfg.image_tokenizer.vit.image_size == 32  # interpolation runs
    assert (cfg.tokenizer.plane_size, cfg.tokenizer.num_channels, cfg.backbone.in_channels) == (8, 64, 64)
    assert (cfg.decoder.in_channels, cfg.decoder.n_neurons, cfg.decoder.n_hidden_layers) == (24, 16, 2)


def test_tiny_density_crosses_the_threshold_in_an_ellipsoid(tiny: TripoSR) -> None:
    points = grid_points(32, tiny.radius)
    rng = np.random.default_rng(18)
    images = [
        Image.new("RGB", (64, 64), (128, 128, 128)),
        Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)),
        Image.new("RGB", (300, 300), (230, 20, 20)),
    ]
    codes = tiny.encode(tiny.preprocess(images))
    fractions = []
    for code in codes:
        density = tiny.query_density(code, points)
        inside = density > 25.0
        fractions.append(float(inside.float().mean()))
        assert 0.05 < fractions[-1] < 0.6
        assert float(density.min()) < 1.0 and float(density.max()) > 100.0  # well below and above 25
        # Not touching the cube: a closed surface. Extents ordered x > y > z, as planted.
        extent = points[inside].abs().amax(0) / tiny.radius
        assert float(extent.max()) < 0.95
        assert extent[0] > extent[1] > extent[2]
        for axis, semi in enumerate(ELLIPSOID_SEMI_AXES):
            assert abs(float(extent[axis]) - semi) < 0.12
    assert len(set(fractions)) > 1  # the image matters


def test_tiny_generation_is_deterministic(tiny_folder: Path, tmp_path: Path) -> None:
    again = write_tiny_triposr(tmp_path / "again")
    other = write_tiny_triposr(tmp_path / "other", seed=1)
    for name in ("config.yaml", "vit_config.json", "model.ckpt"):
        assert (again / name).read_bytes() == (tiny_folder / name).read_bytes()
    assert (other / "model.ckpt").read_bytes() != (tiny_folder / "model.ckpt").read_bytes()


def test_ensure_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_tiny_triposr(tmp_path / "models" / "triposr")
    assert (root / ".complete").read_text().strip() == VERSION
    stamp = (root / "model.ckpt").stat().st_mtime_ns
    assert ensure_tiny_triposr(root) == root
    assert (root / "model.ckpt").stat().st_mtime_ns == stamp
    assert not list(root.parent.glob(".triposr.tmp-*"))
    (root / ".complete").unlink()  # incomplete: regenerated
    ensure_tiny_triposr(root)
    assert (root / ".complete").is_file()
    monkeypatch.setenv("KILN_TINY_MODELS", str(tmp_path / "elsewhere"))
    assert default_tiny_root() == tmp_path / "elsewhere" / "triposr"
    monkeypatch.delenv("KILN_TINY_MODELS")
    assert default_tiny_root() == REPO_ROOT / ".kiln" / "tiny-triposr"
    assert os.path.isabs(default_tiny_root())


@pytest.mark.parametrize("resolution", [17, 40])
def test_grid_density_equals_the_point_query_on_the_grid(tiny: TripoSR, resolution: int) -> None:
    pixels = tiny.preprocess([Image.new("RGB", (64, 64), (200, 80, 40))])
    code = tiny.encode(pixels)[0]
    r = tiny.radius
    t = torch.linspace(0.0, 1.0, resolution) * (r - (-r)) + (-r)
    points = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), dim=-1).reshape(-1, 3)  # (i, j, k) = (x, y, z)
    expected = tiny.query_density(code, points).reshape(resolution, resolution, resolution)
    slabs = [
        tiny.grid_density(code, resolution, start, min(start + 6, resolution)) for start in range(0, resolution, 6)
    ]
    got = torch.cat(slabs)
    # Only the order of the first layer's sum differs: float rounding, nothing more.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert got.shape == (resolution, resolution, resolution)

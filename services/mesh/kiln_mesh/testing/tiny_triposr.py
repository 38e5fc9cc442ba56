"""A tiny TripoSR checkpoint, generated offline, in the published folder layout.

The real model is 1.68 GB and cannot be downloaded here, so tests load this instead: the same
`config.yaml` keys and structure (including the `${tokenizer.num_channels}` interpolation), a
`vit_config.json` describing a tiny ViT (its 32 px `image_size` differs from the 64 px
`cond_image_size`, so the position-embedding interpolation runs), and `model.ckpt` (a `torch.save`d
OrderedDict, like the published file) or `model.safetensors`. About 0.5 MB.

The weights are seeded random values, except for a planted structure that gives the density field a
useful shape: the triplane carries 1 - (a_c * col^2 + a_r * row^2) in scene-code channel 0 of each
plane, and a near-linear path through the MLP turns the sum over the planes into the raw density. So
the activated density exceeds TripoSR's 25.0 mesh threshold inside an ellipsoid centred at the origin
with semi-axes of about (0.70, 0.57, 0.44) world units along (x, y, z) - distinct per axis, so axis
mix-ups show - and falls far below it towards the cube's faces: marching cubes gives one closed
surface. The backbone's residual branch is scaled down so the image moves that surface only slightly
(different images still give different meshes). Colours are random functions of position.

Generation is deterministic: the same seed writes identical bytes.

CLI: `python -m kiln_mesh.testing.tiny_triposr [OUT_DIR] [--force]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_YAML",
    "ELLIPSOID_SEMI_AXES",
    "ENV_ROOT",
    "VERSION",
    "VIT_CONFIG",
    "default_tiny_root",
    "ensure_tiny_triposr",
    "main",
    "write_tiny_triposr",
]

VERSION: Final = "kiln-tiny-triposr/1"
"""Content of the stamp file; bump it whenever the generated files change, so stale folders regenerate."""

ENV_ROOT: Final = "KILN_TINY_MODELS"
_STAMP: Final = ".complete"

CONFIG_YAML: Final = """\
cond_image_size: 64

image_tokenizer_cls: tsr.models.tokenizers.image.DINOSingleImageTokenizer
image_tokenizer:
  pretrained_model_name_or_path: "kiln-test/tiny-dino-vit" # described by vit_config.json

tokenizer_cls: tsr.models.tokenizers.triplane.Triplane1DTokenizer
tokenizer:
  plane_size: 8
  num_channels: 64

backbone_cls: tsr.models.transformer.transformer_1d.Transformer1D
backbone:
  in_channels: ${tokenizer.num_channels}
  num_attention_heads: 4
  attention_head_dim: 16
  num_layers: 2
  cross_attention_dim: 32

post_processor_cls: tsr.models.network_utils.TriplaneUpsampleNetwork
post_processor:
  in_channels: 64
  out_channels: 8

decoder_cls: tsr.models.network_utils.NeRFMLP
decoder:
  in_channels: 24 # 3 * 8
  n_neurons: 16
  n_hidden_layers: 2
  activation: silu

renderer_cls: tsr.models.nerf_renderer.TriplaneNeRFRenderer
renderer:
  radius: 0.87 # slightly larger than 0.5 * sqrt(3)
  feature_reduction: concat
  density_activation: exp
  density_bias: -1.0
  num_samples_per_ray: 128
"""

VIT_CONFIG: Final[dict[str, Any]] = {
    "architectures": ["ViTModel"],
    "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 32,
    "image_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "model_type": "vit",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 16,
    "qkv_bias": True,
}

ELLIPSOID_SEMI_AXES: Final = (0.8, 0.65, 0.5)
"""Semi-axes of the planted density > 25 region along x, y, z, in normalised units (x world / radius)."""

_RHO: Final = 0.6  # reference radius: the planted quadratic is scaled so each semi-axis sits at rho / sqrt(alpha)
_PATH_BIAS: Final = 6.0  # keeps the density path in SiLU's near-linear range (inputs 3..9)
_DENSITY_GAIN: Final = 4.0  # raw density per unit of the path: makes the field steep around the surface
_THRESHOLD: Final = 25.0


def write_tiny_triposr(folder: Path, *, seed: int = 0, fmt: Literal["ckpt", "safetensors"] = "ckpt") -> Path:
    """Write a tiny TripoSR model folder: config.yaml, vit_config.json and model.ckpt or model.safetensors.

    A weight file of the other format already in `folder` is removed (the loader prefers safetensors).

    Args:
        folder: Destination (created with its parents as needed).
        seed: Seeds the random weights; the same seed writes identical files.
        fmt: `ckpt` (torch.save of an OrderedDict, as published) or `safetensors`.

    Returns:
        `folder`, ready for `kiln_mesh.triposr.load_triposr`.
    """
    from kiln_mesh.triposr import CKPT_FILE, CONFIG_FILE, SAFETENSORS_FILE, VIT_CONFIG_FILE

    if fmt not in ("ckpt", "safetensors"):
        raise ValueError(f"fmt must be 'ckpt' or 'safetensors', got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(CONFIG_YAML, encoding="utf-8")
    (folder / VIT_CONFIG_FILE).write_text(json.dumps(VIT_CONFIG, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = _tiny_state_dict(folder, seed)
    if fmt == "ckpt":
        import torch

        (folder / SAFETENSORS_FILE).unlink(missing_ok=True)
        torch.save(state, folder / CKPT_FILE)
    else:
        from safetensors.torch import save_file

        (folder / CKPT_FILE).unlink(missing_ok=True)
        save_file(dict(state), str(folder / SAFETENSORS_FILE))
    return folder


def default_tiny_root() -> Path:
    """Where the shared tiny TripoSR folder lives unless a caller says otherwise.

    Returns:
        `$KILN_TINY_MODELS/triposr` if the variable is set, else `<repo>/.kiln/tiny-triposr`
        (`.kiln/` is git-ignored; kept apart from img2img's tiny-models folder, which a forced
        regeneration replaces whole).
    """
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser() / "triposr"
    # services/mesh/kiln_mesh/testing/tiny_triposr.py -> the repository root is 4 levels up.
    return Path(__file__).resolve().parents[4] / ".kiln" / "tiny-triposr"


def ensure_tiny_triposr(root: Path, *, force: bool = False) -> Path:
    """Generate the tiny model (seed 0, model.ckpt) into `root` unless it is already complete there.

    A complete folder (stamp present with the current `VERSION`) is returned at once, without importing
    torch. Otherwise the files are written into a temporary folder beside `root`, the stamp last, and
    the folder is renamed into place, so a crash never leaves a half-written `root`. Concurrent callers
    serialise on a lock file beside `root`.

    Args:
        root: The model folder to create (its parent is created as needed).
        force: Regenerate even if a complete folder exists.

    Returns:
        `root`.
    """
    root = Path(root).absolute()
    if not force and _complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.parent / f".{root.name}.lock"):
        if not force and _complete(root):
            return root
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # crashed generations; no live owner under the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        work.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            write_tiny_triposr(work)
            (work / _STAMP).write_text(VERSION + "\n", encoding="utf-8")  # last: marks the folder complete
            if root.exists() or root.is_symlink():
                old = root.parent / f".{root.name}.tmp-old-{os.getpid()}-{time.monotonic_ns()}"
                os.rename(root, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(work, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not _complete(root):
        raise RuntimeError(f"tiny TripoSR at {root} is incomplete right after generation")
    return root


def _complete(root: Path) -> bool:
    try:
        return (root / _STAMP).read_text(encoding="utf-8").strip() == VERSION
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as handle:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


# ---------------------------------------------------------------------------------------------------------
# Weights


def _tiny_state_dict(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights for the config in `folder`, with the planted density structure (see the module doc)."""
    from collections import OrderedDict

    import torch

    from kiln_mesh.triposr import TripoSR, load_triposr_config

    config = load_triposr_config(folder)
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in TripoSR(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std

    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in shapes.items():  # model order: one generator stream, so the seed fixes every value
        leaf = key.rsplit(".", 1)[-1]
        is_norm = "norm" in key and len(shape) == 1
        if is_norm and leaf == "weight":
            value = 1.0 + normal(*shape, std=0.1)
        elif leaf == "bias":
            value = normal(*shape, std=0.02)
        elif key.endswith(("cls_token", "position_embeddings")):
            value = normal(*shape, std=0.5)  # large enough that the position interpolation visibly matters
        elif key == "tokenizer.embeddings":
            value = normal(*shape, std=0.5)
        else:
            fan_in = math.prod(shape[1:])
            value = normal(*shape, std=1.0 / math.sqrt(fan_in))
        state[key] = value

    # The backbone's residual branch (everything between the input and the final `+ x0`) is kept small,
    # so the planted triplane structure survives and the image perturbs it only slightly.
    state["backbone.proj_out.weight"] *= 0.05
    state["backbone.proj_out.bias"] *= 0.05

    _plant_ellipsoid(state, config.tokenizer.plane_size, normal)
    _plant_density_path(state, config.post_processor.out_channels, config.renderer.density_bias, normal)
    return state


def _plant_ellipsoid(state: dict[str, torch.Tensor], plane_size: int, normal: Any) -> None:
    """Make scene-code channel 0 of each plane equal 1 - (a_col * U^2 + a_row * V^2) at its texel centres.

    U and V are the normalised coordinates ([-1, 1]) of the output texel centres along the plane's
    columns and rows. The transposed convolution (kernel = stride = 2) sees one input texel per output
    2 x 2 block, so the input tokens carry the quadratic at the input texel centre (channel 0) plus the
    pieces its expansion around the output centres needs: U = u + d with d = (2 di - 1) / (2 P) gives
    1 - a (u + d)^2 = (1 - a u^2) - 2 d (a u) - d^2 a, i.e. channels (1 - a_c u^2 - a_r v^2, a_c u, a_r v,
    a_c, a_r) with per-tap weights (1, -2 d_col, -2 d_row, -d_col^2, -d_row^2).
    """
    import torch

    alpha = [_RHO**2 / s**2 for s in ELLIPSOID_SEMI_AXES]  # per world axis x, y, z
    # Plane 0 holds (x cols, y rows), plane 1 (x, z), plane 2 (y, z).
    plane_axes = ((0, 1), (0, 2), (1, 2))
    centres = (2 * torch.arange(plane_size, dtype=torch.float32) + 1) / plane_size - 1
    v, u = torch.meshgrid(centres, centres, indexing="ij")  # v varies along rows, u along columns
    tokens = state["tokenizer.embeddings"]
    for plane, (col_axis, row_axis) in enumerate(plane_axes):
        a_c, a_r = alpha[col_axis], alpha[row_axis]
        tokens[plane, 0] = 1 - a_c * u**2 - a_r * v**2
        tokens[plane, 1] = a_c * u
        tokens[plane, 2] = a_r * v
        tokens[plane, 3] = a_c
        tokens[plane, 4] = a_r
    weight, bias = state["post_processor.upsample.weight"], state["post_processor.upsample.bias"]  # [Cin, Cout, 2, 2]
    weight[:, 0] = 0
    bias[0] = 0
    for di in range(2):
        d_row = (2 * di - 1) / (2 * plane_size)
        for dj in range(2):
            d_col = (2 * dj - 1) / (2 * plane_size)
            weight[0, 0, di, dj] = 1.0
            weight[1, 0, di, dj] = -2 * d_col
            weight[2, 0, di, dj] = -2 * d_row
            weight[3, 0, di, dj] = -(d_col**2)
            weight[4, 0, di, dj] = -(d_row**2)


def _plant_density_path(state: dict[str, torch.Tensor], channels: int, density_bias: float, normal: Any) -> None:
    """Route S = sum of the planes' channel 0 through hidden neuron 0 of every layer to the raw density.

    S = 3 - 2 (a_x x^2 + a_y y^2 + a_z z^2) (normalised coordinates). Neuron 0 carries S + 6 (SiLU is close to
    the identity there); the last layer maps it to raw density with gain 4 and a bias chosen analytically so
    that exp(raw + density_bias) = 25 where a_x x^2 + a_y y^2 + a_z z^2 = rho^2, i.e. on the ellipsoid.
    The other weights into neuron 0 and into the density output are small noise.
    """
    first = state["decoder.layers.0.weight"]
    first[0] = normal(first.shape[1], std=0.02)
    for plane in range(3):
        first[0, plane * channels] = 1.0
    state["decoder.layers.0.bias"][0] = _PATH_BIAS
    linears = sorted(int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.") and k.endswith(".weight"))
    hidden = [f"decoder.layers.{i}" for i in linears[1:-1]]
    last = f"decoder.layers.{linears[-1]}"
    level = _PATH_BIAS + 3 - 2 * _RHO**2  # neuron 0's input on the ellipsoid
    level = level / (1 + math.exp(-level))
    for name in hidden:
        weight = state[f"{name}.weight"]
        weight[1:, 0] *= 0.05  # neuron 0 is large (up to 9): keep it from swamping the others
        weight[0] = normal(weight.shape[1], std=0.02)
        weight[0, 0] = 1.0
        state[f"{name}.bias"][0] = 0.0
        level = level / (1 + math.exp(-level))
    weight, bias = state[f"{last}.weight"], state[f"{last}.bias"]
    weight[0] = normal(weight.shape[1], std=0.02)
    weight[0, 0] = _DENSITY_GAIN
    weight[1:, 0] = 0.0  # colours: random functions of the other neurons
    weight[1:] *= 5.0  # a wide spread of colours
    bias[1:] = 0.0
    bias[0] = math.log(_THRESHOLD) - density_bias - _DENSITY_GAIN * level


# ---------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """Generate the tiny model into OUT_DIR (default: `default_tiny_root()`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", nargs="?", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    args = parser.parse_args(argv)
    root = ensure_tiny_triposr(args.out_dir or default_tiny_root(), force=args.force)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

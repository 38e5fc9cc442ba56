r"""TripoSR's configuration: the published `config.yaml`, its interpolations, and the ViT preset.

The published file holds six `*_cls` entries naming classes of the reference code
and six parameter blocks. It uses OmegaConf interpolation (`${tokenizer.num_channels}`); Kiln does not
depend on OmegaConf, so `resolve_interpolations` implements the subset that configuration files use:
absolute and relative (`${.key}`, `${..key}`) references, references nested inside references
(`${a.${b}}`), references embedded in longer strings, chains of references and `\${` escapes.
Resolvers (`${oc.env:...}`) are rejected.

The image encoder is named by a hub id (`facebook/dino-vitb16`) whose hyper-parameters are hard-coded
here, because nothing may be downloaded; a `vit_config.json` (transformers `ViTConfig` keys)
beside `config.yaml` overrides them, which is how tiny test checkpoints and custom encoders are described.

Every block is validated: unknown keys, wrong types, sizes that do not fit together and options Kiln
does not implement raise `ValueError` naming the key, rather than building a model that silently
computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml  # type: ignore[import-untyped]

__all__ = [
    "CONFIG_FILE",
    "DINO_VITB16",
    "DINO_VITB16_NAME",
    "VIT_CONFIG_FILE",
    "BackboneConfig",
    "DecoderConfig",
    "ImageTokenizerConfig",
    "PostProcessorConfig",
    "RendererConfig",
    "TriplaneTokenizerConfig",
    "TripoSRConfig",
    "ViTConfig",
    "load_triposr_config",
    "parse_triposr_config",
    "parse_vit_config",
    "resolve_interpolations",
]

CONFIG_FILE: Final = "config.yaml"
VIT_CONFIG_FILE: Final = "vit_config.json"

# The published `stabilityai/TripoSR` config.yaml, value for value: tests and the
# stage benchmark build the full-size model from it.
PUBLISHED_CONFIG_YAML = """\
cond_image_size: 512

image_tokenizer_cls: tsr.models.tokenizers.image.DINOSingleImageTokenizer
image_tokenizer:
  pretrained_model_name_or_path: "facebook/dino-vitb16"

tokenizer_cls: tsr.models.tokenizers.triplane.Triplane1DTokenizer
tokenizer:
  plane_size: 32
  num_channels: 1024

backbone_cls: tsr.models.transformer.transformer_1d.Transformer1D
backbone:
  in_channels: ${tokenizer.num_channels}
  num_attention_heads: 16
  attention_head_dim: 64
  num_layers: 16
  cross_attention_dim: 768

post_processor_cls: tsr.models.network_utils.TriplaneUpsampleNetwork
post_processor:
  in_channels: 1024
  out_channels: 40

decoder_cls: tsr.models.network_utils.NeRFMLP
decoder:
  in_channels: 120 # 3 * 40
  n_neurons: 64
  n_hidden_layers: 9
  activation: silu

renderer_cls: tsr.models.nerf_renderer.TriplaneNeRFRenderer
renderer:
  radius: 0.87 # slightly larger than 0.5 * sqrt(3)
  feature_reduction: concat
  density_activation: exp
  density_bias: -1.0
  num_samples_per_ray: 128
"""


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of the ViT image encoder (transformers `ViTConfig` names).

    Attributes:
        hidden_size: Token width.
        num_hidden_layers: Number of encoder layers.
        num_attention_heads: Attention heads per layer (`hidden_size` must divide evenly).
        intermediate_size: Width of the MLP inside each layer.
        image_size: Side of the images the position table was made for (table side = image_size // patch_size).
        patch_size: Side of the square patches (patch-embedding kernel and stride).
        num_channels: Input channels (3).
        layer_norm_eps: Epsilon of every LayerNorm in the encoder.
        hidden_act: MLP activation; only exact `gelu` is implemented.
        qkv_bias: Whether the query/key/value projections have biases.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        """Side of the stored position-embedding grid (14 for DINO ViT-B/16 at 224 px)."""
        return self.image_size // self.patch_size


DINO_VITB16_NAME: Final = "facebook/dino-vitb16"

DINO_VITB16: Final = ViTConfig(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    patch_size=16,
    num_channels=3,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    qkv_bias=True,
)
"""`facebook/dino-vitb16`'s config.json: the transformers `ViTConfig()` defaults."""

_VIT_PRESETS: Final[Mapping[str, ViTConfig]] = {DINO_VITB16_NAME: DINO_VITB16}


@dataclass(frozen=True)
class ImageTokenizerConfig:
    """The `image_tokenizer` block plus the encoder hyper-parameters it resolves to.

    Attributes:
        pretrained_model_name_or_path: The hub id naming the encoder architecture (weights come from TripoSR's file).
        vit: The encoder's hyper-parameters (preset for the name, or `vit_config.json`).
    """

    pretrained_model_name_or_path: str
    vit: ViTConfig


@dataclass(frozen=True)
class TriplaneTokenizerConfig:
    """The `tokenizer` block: learned triplane tokens of shape [3, num_channels, plane_size, plane_size]."""

    plane_size: int
    num_channels: int


@dataclass(frozen=True)
class BackboneConfig:
    """The `backbone` block (`Transformer1D`).

    Attributes:
        in_channels: Token width in and out (= the triplane tokenizer's channels).
        num_attention_heads: Heads of self- and cross-attention.
        attention_head_dim: Width of one head; heads x head_dim is the inner width.
        num_layers: Transformer blocks.
        cross_attention_dim: Width of the image tokens attended to (= the ViT hidden size).
        norm_num_groups: Groups of the input GroupNorm (class default 32).
    """

    in_channels: int
    num_attention_heads: int
    attention_head_dim: int
    num_layers: int
    cross_attention_dim: int
    norm_num_groups: int = 32

    @property
    def inner_dim(self) -> int:
        """Width inside the transformer blocks."""
        return self.num_attention_heads * self.attention_head_dim


@dataclass(frozen=True)
class PostProcessorConfig:
    """The `post_processor` block (`TriplaneUpsampleNetwork`: a 2x transposed convolution)."""

    in_channels: int
    out_channels: int


@dataclass(frozen=True)
class DecoderConfig:
    """The `decoder` block (`NeRFMLP`).

    Attributes:
        in_channels: Features per point (3 x the scene-code channels, planes concatenated).
        n_neurons: Hidden width.
        n_hidden_layers: Hidden layers; the MLP has n_hidden_layers + 1 Linear layers.
        activation: Activation between the Linear layers (`silu`).
    """

    in_channels: int
    n_neurons: int
    n_hidden_layers: int
    activation: str


@dataclass(frozen=True)
class RendererConfig:
    """The `renderer` block (`TriplaneNeRFRenderer`): how the triplane is queried and activated.

    Attributes:
        radius: Half-side of the cube the triplane spans, in world units (0.87).
        feature_reduction: How the three planes' features combine (`concat`).
        density_activation: Applied to raw density + bias (`exp`).
        density_bias: Added to the raw density before the activation (-1.0).
        num_samples_per_ray: Volume-rendering samples per ray (rendering only).
    """

    radius: float
    feature_reduction: str
    density_activation: str
    density_bias: float
    num_samples_per_ray: int


@dataclass(frozen=True)
class TripoSRConfig:
    """The whole model configuration.

    Attributes:
        cond_image_size: Side the input image is resized to before encoding (512).
        image_tokenizer: The ViT image encoder.
        tokenizer: The learned triplane tokens.
        backbone: The triplane transformer.
        post_processor: The triplane upsampler.
        decoder: The per-point MLP.
        renderer: Triplane query conventions.
    """

    cond_image_size: int
    image_tokenizer: ImageTokenizerConfig
    tokenizer: TriplaneTokenizerConfig
    backbone: BackboneConfig
    post_processor: PostProcessorConfig
    decoder: DecoderConfig
    renderer: RendererConfig

    @property
    def scene_code_shape(self) -> tuple[int, int, int, int]:
        """Shape of one image's scene code: [3, channels, 2 x plane_size, 2 x plane_size]."""
        side = 2 * self.tokenizer.plane_size
        return (3, self.post_processor.out_channels, side, side)


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_triposr_config(folder: Path) -> TripoSRConfig:
    """Read `folder/config.yaml` (and `folder/vit_config.json` if present) into a validated config.

    Args:
        folder: A TripoSR model folder.

    Returns:
        The resolved, validated configuration.

    Raises:
        FileNotFoundError: `config.yaml` is missing.
        ValueError: The files do not parse, an interpolation cannot be resolved, or a value is invalid or
            unsupported.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path}: not valid YAML: {exc}") from exc
    vit_overrides: Mapping[str, Any] | None = None
    vit_path = folder / VIT_CONFIG_FILE
    if vit_path.is_file():
        try:
            loaded = json.loads(vit_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{vit_path}: not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"{vit_path}: expected a JSON object, got {type(loaded).__name__}")
        vit_overrides = loaded
    try:
        return parse_triposr_config(raw, vit_overrides=vit_overrides)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from exc


def parse_triposr_config(raw: Any, *, vit_overrides: Mapping[str, Any] | None = None) -> TripoSRConfig:
    """Validate a parsed `config.yaml` tree (interpolations are resolved here).

    Args:
        raw: The YAML document as loaded (a mapping).
        vit_overrides: A transformers `ViTConfig` JSON object overriding the named encoder's preset.

    Returns:
        The validated configuration.

    Raises:
        ValueError: A key is missing, unknown, mistyped, inconsistent or unsupported.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a mapping at the top level, got {type(raw).__name__}")
    tree = resolve_interpolations(raw)
    top = _Block("", tree)
    top.check_cls("image_tokenizer_cls", "tsr.models.tokenizers.image.DINOSingleImageTokenizer")
    top.check_cls("tokenizer_cls", "tsr.models.tokenizers.triplane.Triplane1DTokenizer")
    top.check_cls("backbone_cls", "tsr.models.transformer.transformer_1d.Transformer1D")
    top.check_cls("post_processor_cls", "tsr.models.network_utils.TriplaneUpsampleNetwork")
    top.check_cls("decoder_cls", "tsr.models.network_utils.NeRFMLP")
    top.check_cls("renderer_cls", "tsr.models.nerf_renderer.TriplaneNeRFRenderer")
    cond_image_size = top.positive_int("cond_image_size")

    image_block = top.block("image_tokenizer")
    name = image_block.string("pretrained_model_name_or_path")
    # Training-time switches of the reference class; they do not change inference.
    image_block.optional("freeze", _as_bool, True)
    image_block.optional("enable_gradient_checkpointing", _as_bool, False)
    image_block.finish()
    image_tokenizer = ImageTokenizerConfig(name, _vit_config(name, vit_overrides))

    tok_block = top.block("tokenizer")
    tokenizer = TriplaneTokenizerConfig(tok_block.positive_int("plane_size"), tok_block.positive_int("num_channels"))
    tok_block.finish()

    bb = top.block("backbone")
    backbone = BackboneConfig(
        in_channels=bb.positive_int("in_channels"),
        num_attention_heads=bb.positive_int("num_attention_heads"),
        attention_head_dim=bb.positive_int("attention_head_dim"),
        num_layers=bb.positive_int("num_layers"),
        cross_attention_dim=bb.positive_int("cross_attention_dim"),
        norm_num_groups=bb.optional("norm_num_groups", _as_positive_int, 32),
    )
    # Options of the reference class that Kiln implements only at their defaults.
    out_channels = bb.optional("out_channels", _as_optional_positive_int, None)
    if out_channels not in (None, backbone.in_channels):  # the residual around the backbone needs out == in
        raise ValueError(f"backbone.out_channels = {out_channels} is not supported (only in_channels)")
    bb.fixed("attention_bias", False)
    bb.fixed("activation_fn", "geglu")
    bb.fixed("num_embeds_ada_norm", None)
    bb.fixed("only_cross_attention", False)
    bb.fixed("double_self_attention", False)
    bb.fixed("upcast_attention", False)
    bb.fixed("norm_type", "layer_norm")
    bb.fixed("norm_elementwise_affine", True)
    bb.optional("dropout", _as_float, 0.0)  # inactive at inference
    bb.optional("gradient_checkpointing", _as_bool, False)
    bb.finish()

    pp = top.block("post_processor")
    post_processor = PostProcessorConfig(pp.positive_int("in_channels"), pp.positive_int("out_channels"))
    pp.finish()

    dec = top.block("decoder")
    decoder = DecoderConfig(
        in_channels=dec.positive_int("in_channels"),
        n_neurons=dec.positive_int("n_neurons"),
        n_hidden_layers=dec.positive_int("n_hidden_layers"),
        activation=dec.choice("activation", ("silu",)),
    )
    dec.fixed("bias", True)
    # Initialisers are irrelevant when the weights are loaded.
    dec.optional("weight_init", _as_str, "kaiming_uniform")
    dec.optional("bias_init", _as_any, None)
    dec.finish()

    ren = top.block("renderer")
    renderer = RendererConfig(
        radius=ren.positive_float("radius"),
        feature_reduction=ren.choice("feature_reduction", ("concat",)),
        density_activation=ren.choice("density_activation", ("exp",)),
        density_bias=ren.float_("density_bias"),
        num_samples_per_ray=ren.positive_int("num_samples_per_ray"),
    )
    ren.fixed("color_activation", "sigmoid")
    ren.fixed("randomized", False)
    ren.finish()
    top.finish()

    config = TripoSRConfig(cond_image_size, image_tokenizer, tokenizer, backbone, post_processor, decoder, renderer)
    _check_consistency(config)
    return config


def parse_vit_config(raw: Mapping[str, Any], *, base: ViTConfig | None = None) -> ViTConfig:
    """Read transformers `ViTConfig` JSON keys over `base` (other `PretrainedConfig` keys are ignored).

    Args:
        raw: The JSON object.
        base: Values for keys the object lacks; without it, the architecture keys are required.

    Returns:
        The validated encoder hyper-parameters.

    Raises:
        ValueError: A value is missing, mistyped or unsupported.
    """
    block = _Block(VIT_CONFIG_FILE, raw, ignore_unknown=True)
    model_type = block.optional("model_type", _as_str, "vit")
    if model_type != "vit":
        raise ValueError(f"{VIT_CONFIG_FILE}: model_type {model_type!r} is not supported (only 'vit')")
    # Without a base the architecture keys are required; the rest have transformers' defaults.
    defaults: dict[str, Any] = (
        dataclasses.asdict(base)
        if base is not None
        else {"num_channels": 3, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": True}
    )
    converters: dict[str, _Converter[Any]] = {
        "hidden_size": _as_positive_int,
        "num_hidden_layers": _as_positive_int,
        "num_attention_heads": _as_positive_int,
        "intermediate_size": _as_positive_int,
        "image_size": _as_positive_int,
        "patch_size": _as_positive_int,
        "num_channels": _as_positive_int,
        "layer_norm_eps": _as_positive_float,
        "hidden_act": _as_str,
        "qkv_bias": _as_bool,
    }
    values: dict[str, Any] = {}
    for key, convert in converters.items():
        if key in raw:
            values[key] = block.required(key, convert)
        elif key in defaults:
            values[key] = defaults[key]
        else:
            raise ValueError(f"{VIT_CONFIG_FILE}: missing key {key}")
    config = ViTConfig(**values)
    if config.hidden_act != "gelu":
        raise ValueError(f"{VIT_CONFIG_FILE}: hidden_act {config.hidden_act!r} is not supported (only exact 'gelu')")
    if config.num_channels != 3:
        raise ValueError(f"{VIT_CONFIG_FILE}: num_channels must be 3 (RGB), got {config.num_channels}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{VIT_CONFIG_FILE}: hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {config.num_attention_heads}"
        )
    if config.position_grid < 1:
        raise ValueError(f"{VIT_CONFIG_FILE}: image_size {config.image_size} is smaller than patch_size")
    return config


def _vit_config(name: str, overrides: Mapping[str, Any] | None) -> ViTConfig:
    preset = _VIT_PRESETS.get(name)
    if overrides is not None:
        return parse_vit_config(overrides, base=preset)
    if preset is None:
        raise ValueError(
            f"image_tokenizer.pretrained_model_name_or_path {name!r} has no built-in preset "
            f"(known: {', '.join(sorted(_VIT_PRESETS))}); put a {VIT_CONFIG_FILE} beside {CONFIG_FILE}"
        )
    return preset


def _check_consistency(config: TripoSRConfig) -> None:
    bb, vit = config.backbone, config.image_tokenizer.vit
    checks = [
        (
            bb.in_channels == config.tokenizer.num_channels,
            f"backbone.in_channels {bb.in_channels} != tokenizer.num_channels {config.tokenizer.num_channels}",
        ),
        (
            bb.cross_attention_dim == vit.hidden_size,
            f"backbone.cross_attention_dim {bb.cross_attention_dim} != the image encoder's hidden_size "
            f"{vit.hidden_size}",
        ),
        (
            bb.in_channels % bb.norm_num_groups == 0,
            f"backbone.in_channels {bb.in_channels} is not a multiple of norm_num_groups {bb.norm_num_groups}",
        ),
        (
            config.post_processor.in_channels == bb.in_channels,
            f"post_processor.in_channels {config.post_processor.in_channels} != backbone.in_channels {bb.in_channels}",
        ),
        (
            # feature_reduction concat: three planes side by side.
            config.decoder.in_channels == 3 * config.post_processor.out_channels,
            f"decoder.in_channels {config.decoder.in_channels} != 3 x post_processor.out_channels "
            f"{config.post_processor.out_channels}",
        ),
        (
            config.cond_image_size >= vit.patch_size,
            f"cond_image_size {config.cond_image_size} is smaller than the encoder's patch_size {vit.patch_size}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# ---------------------------------------------------------------------------------------------------------
# Typed access to one block, with the key path in every message

_T = TypeVar("_T")
_Converter = Callable[[Any, str], _T]


class _Block:
    def __init__(self, path: str, raw: Any, *, ignore_unknown: bool = False) -> None:
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
        self._path = path
        self._raw = raw
        self._seen: set[str] = set()
        self._ignore_unknown = ignore_unknown

    def _where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def required(self, key: str, convert: _Converter[_T]) -> _T:
        self._seen.add(key)
        if key not in self._raw:
            raise ValueError(f"missing key {self._where(key)}")
        return convert(self._raw[key], self._where(key))

    def optional(self, key: str, convert: _Converter[_T], default: _T) -> _T:
        self._seen.add(key)
        if key not in self._raw:
            return default
        return convert(self._raw[key], self._where(key))

    def fixed(self, key: str, supported: object) -> None:
        """An option Kiln implements at one value only: absent or equal to it."""
        self._seen.add(key)
        value = self._raw.get(key, supported)
        if value != supported or type(value) is not type(supported):
            raise ValueError(f"{self._where(key)} = {value!r} is not supported (only {supported!r})")

    def block(self, key: str) -> _Block:
        self._seen.add(key)
        if key not in self._raw:
            raise ValueError(f"missing block {self._where(key)}")
        return _Block(self._where(key), self._raw[key])

    def check_cls(self, key: str, expected: str) -> None:
        """A `*_cls` entry names a reference class: only the published architecture is implemented."""
        value = self.optional(key, _as_str, expected)
        if value != expected:
            raise ValueError(f"{self._where(key)} = {value!r} is not supported (only {expected!r})")

    def positive_int(self, key: str) -> int:
        return self.required(key, _as_positive_int)

    def positive_float(self, key: str) -> float:
        return self.required(key, _as_positive_float)

    def float_(self, key: str) -> float:
        return self.required(key, _as_float)

    def string(self, key: str) -> str:
        return self.required(key, _as_str)

    def choice(self, key: str, supported: tuple[str, ...]) -> str:
        value = self.required(key, _as_str)
        if value not in supported:
            raise ValueError(
                f"{self._where(key)} = {value!r} is not supported (supported: {', '.join(map(repr, supported))})"
            )
        return value

    def finish(self) -> None:
        if self._ignore_unknown:
            return
        unknown = sorted(str(k) for k in self._raw if k not in self._seen)
        if unknown:
            raise ValueError(f"unknown key(s) in {self._path or 'config'}: {', '.join(unknown)}")


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ValueError(f"{where}: expected an integer, got {value!r}")


def _as_positive_int(value: Any, where: str) -> int:
    number = _as_int(value, where)
    if number <= 0:
        raise ValueError(f"{where}: expected a positive integer, got {number}")
    return number


def _as_optional_positive_int(value: Any, where: str) -> int | None:
    return None if value is None else _as_positive_int(value, where)


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-5` without a dot as a string; OmegaConf would convert it.
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    else:
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return number


def _as_positive_float(value: Any, where: str) -> float:
    number = _as_float(value, where)
    if number <= 0:
        raise ValueError(f"{where}: expected a positive number, got {number}")
    return number


def _as_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _as_any(value: Any, where: str) -> Any:
    return value


def _as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# OmegaConf-style interpolation

_Path = tuple[str, ...]


def resolve_interpolations(tree: Mapping[str, Any]) -> dict[str, Any]:
    r"""Return a copy of `tree` with OmegaConf-style `${...}` references replaced by their values.

    A string that is exactly one reference takes the referenced value with its type (`${a.b}` -> 1024);
    references inside a longer string are replaced by their text (`"x${a.b}"` -> `"x1024"`). Keys are
    dotted paths from the root; leading dots make them relative (`${.k}` is a sibling, each further dot
    goes one level up); list items are addressed by index. References may be nested (`${a.${b}}`) and
    may point at values that are themselves references. `\${` stands for a literal `${`.

    Args:
        tree: A parsed YAML mapping.

    Returns:
        The resolved tree (new dicts and lists; scalars shared).

    Raises:
        ValueError: A reference is unknown, circular, malformed, uses a resolver, or embeds a
            non-scalar value in a string.
    """
    return _Resolver(tree).resolve_mapping((), tree)


class _Resolver:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self._root = root
        self._done: dict[_Path, Any] = {}
        self._active: list[_Path] = []

    def resolve_mapping(self, path: _Path, node: Mapping[Any, Any]) -> dict[Any, Any]:
        return {key: self.resolve_at((*path, str(key)), value) for key, value in node.items()}

    def resolve_at(self, path: _Path, value: Any) -> Any:
        if path in self._done:
            return self._done[path]
        if path in self._active:
            cycle = " -> ".join(".".join(p) for p in [*self._active[self._active.index(path) :], path])
            raise ValueError(f"circular interpolation: {cycle}")
        self._active.append(path)
        try:
            if isinstance(value, Mapping):
                result: Any = self.resolve_mapping(path, value)
            elif isinstance(value, list):
                result = [self.resolve_at((*path, str(i)), item) for i, item in enumerate(value)]
            elif isinstance(value, str):
                result = self._resolve_string(path, value)
            else:
                result = value
        finally:
            self._active.pop()
        self._done[path] = result
        return result

    def _resolve_string(self, path: _Path, text: str) -> Any:
        if "${" not in text:
            return text
        pieces = _parse(text, ".".join(path))
        if len(pieces) == 1 and isinstance(pieces[0], _Ref):
            return self._value_of(path, pieces[0])  # whole-value interpolation keeps the type
        out: list[str] = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = self._value_of(path, piece)
            if isinstance(value, Mapping | list):
                raise ValueError(
                    f"{'.'.join(path)}: interpolation ${{{piece.source}}} inside a string refers to a "
                    f"{type(value).__name__}, not a scalar"
                )
            out.append(str(value))
        return "".join(out)

    def _value_of(self, path: _Path, ref: _Ref) -> Any:
        key_parts: list[str] = []
        for piece in ref.pieces:
            if isinstance(piece, str):
                key_parts.append(piece)
            else:
                inner = self._value_of(path, piece)
                if isinstance(inner, Mapping | list):
                    raise ValueError(f"{'.'.join(path)}: nested interpolation ${{{piece.source}}} is not a scalar")
                key_parts.append(str(inner))
        key = "".join(key_parts).strip()
        where = ".".join(path)
        if not key or ":" in key:
            raise ValueError(
                f"{where}: interpolation ${{{ref.source}}} is not supported (only key references; no resolvers)"
            )
        target = self._locate(path, key, ref.source)
        return self.resolve_at(*target)

    def _locate(self, path: _Path, key: str, source: str) -> tuple[_Path, Any]:
        where = ".".join(path)
        dots = len(key) - len(key.lstrip("."))
        if dots:
            # Relative: one dot is the mapping holding the referring value, each extra dot one level up.
            if dots > len(path):
                raise ValueError(f"{where}: interpolation ${{{source}}} climbs above the root")
            base, rest = path[: len(path) - dots], key[dots:]
        else:
            base, rest = (), key
        parts = [p for p in re.split(r"\.|\[(\d+)\]", rest) if p]
        node: Any = self._root
        for part in base:
            node = node[int(part)] if isinstance(node, list) else node[part]
        found: list[str] = list(base)
        for part in parts:
            if isinstance(node, str) and "${" in node:
                node = self.resolve_at(tuple(found), node)  # walking through an alias of a block
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ValueError(f"{where}: interpolation ${{{source}}} refers to an unknown key {'.'.join(parts)!r}")
            found.append(part)
        return tuple(found), node


@dataclass(frozen=True)
class _Ref:
    source: str
    pieces: tuple[str | _Ref, ...]


def _parse(text: str, where: str) -> list[str | _Ref]:
    """Split `text` into literal text and references; references may nest."""
    pieces, end = _parse_until(text, 0, where, closing=False)
    assert end == len(text)
    # Merge adjacent literals (escapes split them).
    merged: list[str | _Ref] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif piece != "":
            merged.append(piece)
    return merged


def _parse_until(text: str, start: int, where: str, *, closing: bool) -> tuple[list[str | _Ref], int]:
    pieces: list[str | _Ref] = []
    literal: list[str] = []
    i = start
    while i < len(text):
        if text.startswith("\\${", i):
            literal.append("${")
            i += 3
        elif text.startswith("${", i):
            if literal:
                pieces.append("".join(literal))
                literal = []
            inner, end = _parse_until(text, i + 2, where, closing=True)
            pieces.append(_Ref(text[i + 2 : end - 1], tuple(inner)))
            i = end
        elif closing and text[i] == "}":
            if literal:
                pieces.append("".join(literal))
            return pieces, i + 1
        else:
            literal.append(text[i])
            i += 1
    if closing:
        raise ValueError(f"{where}: unterminated interpolation in {text!r}")
    if literal:
        pieces.append("".join(literal))
    return pieces, i

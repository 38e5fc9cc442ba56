r"""TripoSR's configuration: the published `config.yaml`, its interpolations, and the ViT preset.

The published file holds six `*_cls` entries naming classes of the reference code and six parameter
blocks. Kiln reads it with OmegaConf, as the reference implementation does, so its interpolations
(`${tokenizer.num_channels}`; relative, nested and escaped ones too) mean exactly what they mean there.
Resolvers (`${oc.env:...}`) are refused: a model folder has no business reading the server's
environment, and the published file uses none.

The image encoder is named by a hub id (`facebook/dino-vitb16`) whose hyper-parameters are hard-coded
here, because nothing may be downloaded; a `vit_config.json` (transformers `ViTConfig` keys)
beside `config.yaml` overrides them, which is how tiny test checkpoints and custom encoders are described.

Every block is a pydantic model: unknown keys, wrong types, sizes that do not fit together and options
Kiln does not implement raise `ValueError` naming the key (`renderer.num_samples_per_ray: expected an
integer, got 'x'`), rather than building a model that silently computes something else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self, TypeVar, cast

import yaml  # type: ignore[import-untyped]
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_validator

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


def _not_a_bool(value: Any) -> Any:
    # pydantic reads `true` as 1; a YAML `yes` where a size belongs is a mistake, not a number.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


_PositiveInt = Annotated[int, Field(gt=0), BeforeValidator(_not_a_bool)]
_Float = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_a_bool)]
_PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_not_a_bool)]


class _Frozen(BaseModel):
    """Immutable, and a key the model does not declare is an error rather than ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ViTConfig(_Frozen):
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

    hidden_size: _PositiveInt
    num_hidden_layers: _PositiveInt
    num_attention_heads: _PositiveInt
    intermediate_size: _PositiveInt
    image_size: _PositiveInt
    patch_size: _PositiveInt
    num_channels: _PositiveInt = 3
    layer_norm_eps: _PositiveFloat = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: StrictBool = True

    @model_validator(mode="after")
    def _supported(self) -> Self:
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only exact 'gelu')")
        if self.num_channels != 3:
            raise ValueError(f"num_channels must be 3 (RGB), got {self.num_channels}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.position_grid < 1:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size")
        return self

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


class ImageTokenizerConfig(_Frozen):
    """The `image_tokenizer` block plus the encoder hyper-parameters it resolves to.

    Attributes:
        pretrained_model_name_or_path: The hub id naming the encoder architecture (weights come from TripoSR's file).
        vit: The encoder's hyper-parameters (preset for the name, or `vit_config.json`); not a `config.yaml` key.
        freeze: Training-time switch of the reference class; no effect at inference.
        enable_gradient_checkpointing: Training-time switch of the reference class; no effect at inference.
    """

    pretrained_model_name_or_path: str
    vit: ViTConfig
    freeze: StrictBool = True
    enable_gradient_checkpointing: StrictBool = False


class TriplaneTokenizerConfig(_Frozen):
    """The `tokenizer` block: learned triplane tokens of shape [3, num_channels, plane_size, plane_size]."""

    plane_size: _PositiveInt
    num_channels: _PositiveInt


class BackboneConfig(_Frozen):
    """The `backbone` block (`Transformer1D`).

    The reference class has more options; Kiln implements them at their defaults only, so they are
    declared with the one value accepted (`attention_bias: false`, `activation_fn: geglu`, ...).

    Attributes:
        in_channels: Token width in and out (= the triplane tokenizer's channels).
        num_attention_heads: Heads of self- and cross-attention.
        attention_head_dim: Width of one head; heads x head_dim is the inner width.
        num_layers: Transformer blocks.
        cross_attention_dim: Width of the image tokens attended to (= the ViT hidden size).
        norm_num_groups: Groups of the input GroupNorm (class default 32).
    """

    in_channels: _PositiveInt
    num_attention_heads: _PositiveInt
    attention_head_dim: _PositiveInt
    num_layers: _PositiveInt
    cross_attention_dim: _PositiveInt
    norm_num_groups: _PositiveInt = 32
    out_channels: _PositiveInt | None = None
    attention_bias: Literal[False] = False
    activation_fn: Literal["geglu"] = "geglu"
    num_embeds_ada_norm: None = None
    only_cross_attention: Literal[False] = False
    double_self_attention: Literal[False] = False
    upcast_attention: Literal[False] = False
    norm_type: Literal["layer_norm"] = "layer_norm"
    norm_elementwise_affine: Literal[True] = True
    dropout: _Float = 0.0  # inactive at inference
    gradient_checkpointing: StrictBool = False

    @model_validator(mode="after")
    def _supported(self) -> Self:
        if self.out_channels not in (None, self.in_channels):  # the residual around the backbone needs out == in
            raise ValueError(f"out_channels = {self.out_channels} is not supported (only in_channels)")
        if self.in_channels % self.norm_num_groups:
            raise ValueError(
                f"in_channels {self.in_channels} is not a multiple of norm_num_groups {self.norm_num_groups}"
            )
        return self

    @property
    def inner_dim(self) -> int:
        """Width inside the transformer blocks."""
        return self.num_attention_heads * self.attention_head_dim


class PostProcessorConfig(_Frozen):
    """The `post_processor` block (`TriplaneUpsampleNetwork`: a 2x transposed convolution)."""

    in_channels: _PositiveInt
    out_channels: _PositiveInt


class DecoderConfig(_Frozen):
    """The `decoder` block (`NeRFMLP`).

    Attributes:
        in_channels: Features per point (3 x the scene-code channels, planes concatenated).
        n_neurons: Hidden width.
        n_hidden_layers: Hidden layers; the MLP has n_hidden_layers + 1 Linear layers.
        activation: Activation between the Linear layers (`silu`).
        bias: The Linear layers have biases (the only variant implemented).
        weight_init: Initialiser of the reference class; irrelevant when the weights are loaded.
        bias_init: Initialiser of the reference class; irrelevant when the weights are loaded.
    """

    in_channels: _PositiveInt
    n_neurons: _PositiveInt
    n_hidden_layers: _PositiveInt
    activation: Literal["silu"]
    bias: Literal[True] = True
    weight_init: str = "kaiming_uniform"
    bias_init: Any = None


class RendererConfig(_Frozen):
    """The `renderer` block (`TriplaneNeRFRenderer`): how the triplane is queried and activated.

    Attributes:
        radius: Half-side of the cube the triplane spans, in world units (0.87).
        feature_reduction: How the three planes' features combine (`concat`).
        density_activation: Applied to raw density + bias (`exp`).
        density_bias: Added to the raw density before the activation (-1.0).
        num_samples_per_ray: Volume-rendering samples per ray (rendering only).
        color_activation: Applied to the raw colour (`sigmoid`, the only one implemented).
        randomized: Jittered ray samples (training only; must stay off).
    """

    radius: _PositiveFloat
    feature_reduction: Literal["concat"]
    density_activation: Literal["exp"]
    density_bias: _Float
    num_samples_per_ray: _PositiveInt
    color_activation: Literal["sigmoid"] = "sigmoid"
    randomized: Literal[False] = False


class TripoSRConfig(_Frozen):
    """The whole model configuration.

    Each `*_cls` entry names a class of the reference code; only the published architecture is
    implemented, so each accepts its published value only.

    Attributes:
        cond_image_size: Side the input image is resized to before encoding (512).
        image_tokenizer: The ViT image encoder.
        tokenizer: The learned triplane tokens.
        backbone: The triplane transformer.
        post_processor: The triplane upsampler.
        decoder: The per-point MLP.
        renderer: Triplane query conventions.
    """

    cond_image_size: _PositiveInt
    image_tokenizer: ImageTokenizerConfig
    tokenizer: TriplaneTokenizerConfig
    backbone: BackboneConfig
    post_processor: PostProcessorConfig
    decoder: DecoderConfig
    renderer: RendererConfig
    image_tokenizer_cls: Literal["tsr.models.tokenizers.image.DINOSingleImageTokenizer"] = (
        "tsr.models.tokenizers.image.DINOSingleImageTokenizer"
    )
    tokenizer_cls: Literal["tsr.models.tokenizers.triplane.Triplane1DTokenizer"] = (
        "tsr.models.tokenizers.triplane.Triplane1DTokenizer"
    )
    backbone_cls: Literal["tsr.models.transformer.transformer_1d.Transformer1D"] = (
        "tsr.models.transformer.transformer_1d.Transformer1D"
    )
    post_processor_cls: Literal["tsr.models.network_utils.TriplaneUpsampleNetwork"] = (
        "tsr.models.network_utils.TriplaneUpsampleNetwork"
    )
    decoder_cls: Literal["tsr.models.network_utils.NeRFMLP"] = "tsr.models.network_utils.NeRFMLP"
    renderer_cls: Literal["tsr.models.nerf_renderer.TriplaneNeRFRenderer"] = (
        "tsr.models.nerf_renderer.TriplaneNeRFRenderer"
    )

    @model_validator(mode="after")
    def _blocks_fit_together(self) -> Self:
        bb, vit = self.backbone, self.image_tokenizer.vit
        checks = [
            (
                bb.in_channels == self.tokenizer.num_channels,
                f"backbone.in_channels {bb.in_channels} != tokenizer.num_channels {self.tokenizer.num_channels}",
            ),
            (
                bb.cross_attention_dim == vit.hidden_size,
                f"backbone.cross_attention_dim {bb.cross_attention_dim} != the image encoder's hidden_size "
                f"{vit.hidden_size}",
            ),
            (
                self.post_processor.in_channels == bb.in_channels,
                f"post_processor.in_channels {self.post_processor.in_channels} != backbone.in_channels "
                f"{bb.in_channels}",
            ),
            (
                # feature_reduction concat: three planes side by side.
                self.decoder.in_channels == 3 * self.post_processor.out_channels,
                f"decoder.in_channels {self.decoder.in_channels} != 3 x post_processor.out_channels "
                f"{self.post_processor.out_channels}",
            ),
            (
                self.cond_image_size >= vit.patch_size,
                f"cond_image_size {self.cond_image_size} is smaller than the encoder's patch_size {vit.patch_size}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

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
        raw = OmegaConf.load(config_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
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
        raw: The YAML document as loaded: a mapping, or OmegaConf's `DictConfig`.
        vit_overrides: A transformers `ViTConfig` JSON object overriding the named encoder's preset.

    Returns:
        The validated configuration.

    Raises:
        ValueError: A key is missing, unknown, mistyped, inconsistent or unsupported.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a mapping at the top level, got {type(raw).__name__}")
    tree = resolve_interpolations(raw)
    image = tree.get("image_tokenizer")
    if isinstance(image, dict):
        if "vit" in image:
            raise ValueError("unknown key(s) in image_tokenizer: vit")
        name = image.get("pretrained_model_name_or_path")
        # A name that is not a string gets its own error from validation; the preset only stands in.
        image["vit"] = _vit_config(name, vit_overrides) if isinstance(name, str) else DINO_VITB16
    return _validate(TripoSRConfig, tree)


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
    model_type = raw.get("model_type", "vit")
    if model_type != "vit":
        raise ValueError(f"{VIT_CONFIG_FILE}: model_type {model_type!r} is not supported (only 'vit')")
    known = {key: value for key, value in raw.items() if key in ViTConfig.model_fields}
    values = {**base.model_dump(), **known} if base is not None else known
    return _validate(ViTConfig, values, where=VIT_CONFIG_FILE)


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


# ---------------------------------------------------------------------------------------------------------
# Interpolation (OmegaConf) and validation errors (pydantic) as messages that name the key


def resolve_interpolations(tree: Mapping[Any, Any]) -> dict[Any, Any]:
    r"""Return a plain copy of `tree` with its OmegaConf `${...}` interpolations resolved.

    OmegaConf's semantics apply: a value that is exactly one reference keeps the referenced type, a
    reference inside a longer string is replaced by its text, leading dots make a key relative, and
    `\${` is a literal `${`. Resolvers (`${name:args}`) are refused.

    Args:
        tree: A parsed YAML mapping (a dict or OmegaConf's `DictConfig`).

    Returns:
        The resolved tree as plain dicts and lists; `tree` itself is not modified.

    Raises:
        ValueError: A reference is unknown, circular, malformed or calls a resolver; the message
            starts with the key holding it.
    """
    try:
        # `dict(config)` would resolve (and unescape) top-level values; a DictConfig is copied as it is.
        config = OmegaConf.create(tree if isinstance(tree, DictConfig) else dict(tree))
        _reject_resolvers(OmegaConf.to_container(config, resolve=False), "")
        resolved = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        full_key = getattr(exc, "full_key", None)
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, GrammarParseError):
            first_line = f"malformed interpolation: {first_line}"
        raise ValueError(f"{full_key}: {first_line}" if full_key else first_line) from None
    return cast(dict[Any, Any], resolved)


def _reject_resolvers(node: Any, where: str) -> None:
    """Refuse `${name:args}` anywhere in `node` (OmegaConf.create has already refused malformed interpolations)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _reject_resolvers(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _reject_resolvers(value, f"{where}.{index}")
    elif isinstance(node, str) and "${" in node and _calls_resolver(parse(node)):
        raise ValueError(f"{where}: {node!r} calls a resolver; only key references are supported (no resolvers)")


def _calls_resolver(context: Any) -> bool:
    if isinstance(context, OmegaConfGrammarParser.InterpolationResolverContext):
        return True
    children = getattr(context, "getChildren", None)  # parse-tree leaves (tokens) have none
    return children is not None and any(_calls_resolver(child) for child in children())


_Model = TypeVar("_Model", bound=BaseModel)

# pydantic error types whose message is "expected <this>, got <input>".
_EXPECTED: Final[Mapping[str, str]] = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "bool_type": "true or false",
}


def _validate(model: type[_Model], data: Any, *, where: str = "") -> _Model:
    """`model.model_validate(data)`, with a `ValueError` naming each offending key instead of pydantic's."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message = _describe(exc)
        raise ValueError(f"{where}: {message}" if where else message) from None


def _describe(exc: ValidationError) -> str:
    unknown: dict[str, list[str]] = {}
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        path = [str(part) for part in error["loc"]]
        if error["type"] == "extra_forbidden":
            unknown.setdefault(".".join(path[:-1]) or "config", []).append(path[-1])
        else:
            problems.append(_problem(".".join(path), error["type"], error["input"], error.get("ctx", {}), error["msg"]))
    problems += [f"unknown key(s) in {block}: {', '.join(sorted(keys))}" for block, keys in unknown.items()]
    return "; ".join(problems)


def _problem(where: str, kind: str, value: Any, ctx: Mapping[str, Any], fallback: str) -> str:
    if kind == "missing":
        return f"missing key {where}"
    if kind == "literal_error":
        return f"{where} = {value!r} is not supported (supported: {ctx['expected']})"
    if kind == "none_required":
        return f"{where} = {value!r} is not supported (only None)"
    if kind == "model_type":
        return f"{where}: expected a mapping, got {type(value).__name__}"
    if kind == "greater_than":
        noun = "number" if isinstance(ctx["gt"], float) else "integer"
        return f"{where}: expected a positive {noun}, got {value!r}"
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}, got {value!r}"
    text = str(ctx["error"]) if kind == "value_error" else fallback
    return f"{where}: {text}" if where else text

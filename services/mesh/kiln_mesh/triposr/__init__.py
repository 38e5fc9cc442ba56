"""Kiln's own TripoSR: configuration, model and strict checkpoint loading (no transformers).

`load_triposr(folder)` reads a published-layout folder (`config.yaml` + `model.ckpt` or
`model.safetensors`) and returns a `TripoSR` whose `preprocess` -> `encode` -> `query` /
`query_density` follow the reference implementation.
"""

from kiln_mesh.triposr.checkpoint import CKPT_FILE, SAFETENSORS_FILE, CheckpointMismatch, load_triposr
from kiln_mesh.triposr.config import (
    CONFIG_FILE,
    VIT_CONFIG_FILE,
    BackboneConfig,
    DecoderConfig,
    ImageTokenizerConfig,
    PostProcessorConfig,
    RendererConfig,
    TriplaneTokenizerConfig,
    TripoSRConfig,
    ViTConfig,
    load_triposr_config,
    parse_triposr_config,
    resolve_interpolations,
)
from kiln_mesh.triposr.model import TripoSR

__all__ = [
    "CKPT_FILE",
    "CONFIG_FILE",
    "SAFETENSORS_FILE",
    "VIT_CONFIG_FILE",
    "BackboneConfig",
    "CheckpointMismatch",
    "DecoderConfig",
    "ImageTokenizerConfig",
    "PostProcessorConfig",
    "RendererConfig",
    "TriplaneTokenizerConfig",
    "TripoSR",
    "TripoSRConfig",
    "ViTConfig",
    "load_triposr",
    "load_triposr_config",
    "parse_triposr_config",
    "resolve_interpolations",
]

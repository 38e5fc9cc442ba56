"""What a mesh provider takes and returns; every image-to-mesh backend implements this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from kiln_mesh.mesh import Mesh
from kiln_runtime.provider import Provider


@dataclass(frozen=True)
class MeshInput:
    """A validated request with its decoded image (any mode; alpha kept for `auto`)."""

    image: Image.Image
    remove_background: str  # "AUTO" | "ALWAYS" | "NEVER"
    foreground_ratio: float
    mc_resolution: int
    mc_threshold: float
    seed: int = 0


@dataclass(frozen=True)
class MeshOutput:
    """The reconstructed mesh in the model's native frame."""

    mesh: Mesh
    background_removed: bool


class MeshModel(Provider[MeshInput, MeshOutput], Protocol):
    """An image-to-mesh provider (local TripoSR, vendor API, or the fake)."""

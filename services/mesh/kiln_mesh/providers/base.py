"""What a mesh provider takes and returns; every image-to-mesh backend implements this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from kiln_mesh.mesh import Mesh, TexturedMesh
from kiln_runtime.provider import Provider


@dataclass(frozen=True)
class MeshInput:
    """A validated request with its decoded image (any mode; alpha kept for `auto`)."""

    image: Image.Image
    remove_background: str  # "AUTO" | "ALWAYS" | "NEVER"
    foreground_ratio: float
    mc_resolution: int
    mc_threshold: float
    bake_texture: bool = False
    texture_resolution: int = 0
    output_format: str = "GLB"  # the requested file format; vendors that return files need it


@dataclass(frozen=True)
class MeshOutput:
    """The reconstructed mesh in the model's native frame, or a vendor's finished file.

    Exactly one of `mesh`, `textured` and `encoded` is set: a vertex-coloured mesh, a mesh with
    a baked UV texture, or file bytes (GLB) a vendor returned, passed through as they are.
    """

    background_removed: bool
    mesh: Mesh | None = None
    textured: TexturedMesh | None = None
    encoded: bytes | None = None
    vertex_count: int = 0
    face_count: int = 0


class MeshModel(Provider[MeshInput, MeshOutput], Protocol):
    """An image-to-mesh provider (local TripoSR, vendor API, or the fake)."""

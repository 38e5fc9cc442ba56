"""The in-memory triangle mesh the mesh service produces, plus a test sphere and frame changes.

Kept to plain numpy arrays so that every provider (TripoSR, the fake, a vendor) hands the
exporters the same thing; the exporters write it without a mesh library except for the
textured GLB (trimesh, see `export.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["NATIVE_TO_Y_UP", "Mesh", "TexturedMesh", "to_y_up", "transform", "transform_textured", "uv_sphere"]

# Face indices may arrive as int64 (numpy's default, marching cubes) or uint32 (GPU-friendly).
_FACE_DTYPES: Final = (np.dtype(np.int64), np.dtype(np.uint32))

# TripoSR's native frame -> the Y-up glTF frame of the reference app, as a matrix applied to
# column vectors (p_y_up = NATIVE_TO_Y_UP @ p_native). The reference Gradio app rotates -90
# degrees about X, then +90 degrees about Y, before exporting; combined:
#
#     [x']   [ 0 -1  0] [x]   [-y]
#     [y'] = [ 0  0  1] [y] = [ z]      native Z-up becomes Y-up,
#     [z']   [-1  0  0] [z]   [-x]      native X ("back") becomes -Z.
#
# A proper rotation (det +1), so triangles keep their counter-clockwise = outward winding.
# `transform` flips the winding if this is ever replaced by an improper matrix (det -1, a
# mirror), so it stays outward either way.
NATIVE_TO_Y_UP: Final[npt.NDArray[np.float64]] = np.array(
    [
        [0.0, -1.0, 0.0],
        [0.0, 0.0, 1.0],
        [-1.0, 0.0, 0.0],
    ],
    dtype=np.float64,
)
NATIVE_TO_Y_UP.flags.writeable = False


@dataclass(frozen=True, eq=False)
class Mesh:
    """An indexed triangle mesh with per-vertex colours, validated on construction.

    Exporters trust these invariants instead of re-checking them, so a bad array fails here,
    where the provider that built it is still on the stack, not deep inside a file writer.
    ``eq=False`` because ``==`` on arrays is elementwise and would make ``Mesh == Mesh`` raise.

    Attributes:
        vertices: (N, 3) float32 positions, finite, in whatever frame the producer documents.
        faces: (M, 3) int64 or uint32 vertex indices in [0, N); counter-clockwise seen from
            outside (right-hand rule normal points outward).
        vertex_colors: (N, 3) uint8 RGB, one per vertex.
    """

    vertices: npt.NDArray[np.float32]
    faces: npt.NDArray[np.int64] | npt.NDArray[np.uint32]
    vertex_colors: npt.NDArray[np.uint8]

    def __post_init__(self) -> None:
        v, f, c = self.vertices, self.faces, self.vertex_colors
        if not isinstance(v, np.ndarray) or v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"vertices must be an (N, 3) array, got shape {_shape(v)}")
        if v.dtype != np.float32:
            raise ValueError(f"vertices must be float32, got {v.dtype}")
        if not isinstance(f, np.ndarray) or f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"faces must be an (M, 3) array, got shape {_shape(f)}")
        if f.dtype not in _FACE_DTYPES:
            raise ValueError(f"faces must be int64 or uint32, got {f.dtype}")
        if not isinstance(c, np.ndarray) or c.ndim != 2 or c.shape[1] != 3:
            raise ValueError(f"vertex_colors must be an (N, 3) array, got shape {_shape(c)}")
        if c.dtype != np.uint8:
            raise ValueError(f"vertex_colors must be uint8, got {c.dtype}")
        if c.shape[0] != v.shape[0]:
            raise ValueError(f"vertex_colors has {c.shape[0]} rows but there are {v.shape[0]} vertices")
        # JSON (glTF min/max) has no NaN/inf, and no viewer can draw them anyway.
        if not np.isfinite(v).all():
            raise ValueError("vertices must all be finite")
        if f.size:
            lo, hi = int(f.min()), int(f.max())
            if lo < 0 or hi >= v.shape[0]:
                raise ValueError(f"face indices must lie in [0, {v.shape[0]}), got [{lo}, {hi}]")

    @property
    def vertex_count(self) -> int:
        """Number of vertices (N)."""
        return int(self.vertices.shape[0])

    @property
    def face_count(self) -> int:
        """Number of triangles (M)."""
        return int(self.faces.shape[0])


def _shape(a: object) -> object:
    return getattr(a, "shape", type(a).__name__)


def uv_sphere(
    radius: float,
    segments: int,
    rings: int,
    *,
    center: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Mesh:
    """Build a closed, outward-wound UV sphere with position-derived colours.

    Used by the fake provider and by tests because its properties (closed, outward, every vertex
    at ``radius`` from ``center``) are easy to check, and it is fully deterministic. The poles lie
    on the Z axis and are single vertices, so there are no seam duplicates and the mesh is a
    closed 2-manifold: ``2 + segments * (rings - 1)`` vertices, ``2 * segments * (rings - 1)``
    faces.

    Args:
        radius: Sphere radius, > 0.
        segments: Vertices around each ring (longitude steps), >= 3.
        rings: Latitude bands from pole to pole, >= 2.
        center: Sphere centre.

    Returns:
        The sphere; vertex colour = ``((p - center) / radius + 1) / 2 * 255`` per channel, rounded.

    Raises:
        ValueError: If an argument is out of range.
    """
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius}")
    if segments < 3:
        raise ValueError(f"segments must be >= 3, got {segments}")
    if rings < 2:
        raise ValueError(f"rings must be >= 2, got {rings}")

    # Unit-sphere directions in float64; the float32 cast happens once at the end.
    theta = np.pi * np.arange(1, rings, dtype=np.float64) / rings  # polar angle from +Z, poles excluded
    phi = 2.0 * np.pi * np.arange(segments, dtype=np.float64) / segments
    sin_t, cos_t = np.sin(theta)[:, None], np.cos(theta)[:, None]
    ring_dirs = np.stack(
        np.broadcast_arrays(sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t),
        axis=-1,
    ).reshape(-1, 3)
    dirs = np.concatenate([[[0.0, 0.0, 1.0]], ring_dirs, [[0.0, 0.0, -1.0]]])

    top, bottom = 0, 1 + segments * (rings - 1)
    j = np.arange(segments, dtype=np.int64)
    j_next = (j + 1) % segments

    def ring(i: int | npt.NDArray[np.int64], col: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Index of the vertex on ring ``i`` (0 = the one nearest the top pole) at column ``col``."""
        return np.asarray(1 + i * segments + col, dtype=np.int64)

    # phi increases counter-clockwise seen from +Z, so (top, ring0[j], ring0[j+1]) is CCW from
    # outside; the bottom cap is the mirror image and the bands follow the same orientation.
    top_cap = np.stack([np.full(segments, top), ring(0, j), ring(0, j_next)], axis=-1)
    bottom_cap = np.stack([np.full(segments, bottom), ring(rings - 2, j_next), ring(rings - 2, j)], axis=-1)
    i = np.arange(rings - 2, dtype=np.int64)[:, None]
    a, b = ring(i, j), ring(i, j_next)  # upper ring of each band
    c, d = ring(i + 1, j), ring(i + 1, j_next)  # lower ring
    bands = np.concatenate([np.stack([a, c, d], axis=-1).reshape(-1, 3), np.stack([a, d, b], axis=-1).reshape(-1, 3)])
    faces = np.concatenate([top_cap, bands, bottom_cap]).astype(np.int64)

    vertices = (dirs * radius + np.asarray(center, dtype=np.float64)).astype(np.float32)
    colors = np.rint((dirs + 1.0) / 2.0 * 255.0).clip(0, 255).astype(np.uint8)
    return Mesh(vertices=vertices, faces=faces, vertex_colors=colors)


@dataclass(frozen=True, eq=False)
class TexturedMesh:
    """A triangle mesh whose colour lives in a UV-mapped texture image (texture baking).

    Vertices are split along UV seams, so `uvs` has one row per vertex. UV (0, 0) is the
    texture's top-left corner, as glTF defines it.
    """

    vertices: npt.NDArray[np.float32]  # (N, 3)
    faces: npt.NDArray[Any]  # (M, 3), counter-clockwise = outward
    uvs: npt.NDArray[np.float32]  # (N, 2) in [0, 1]
    texture: Image.Image  # RGB or RGBA

    def __post_init__(self) -> None:
        if self.uvs.shape != (len(self.vertices), 2):
            raise ValueError(f"uvs must have shape ({len(self.vertices)}, 2), got {self.uvs.shape}")
        # The geometry rules are Mesh's: reuse them with placeholder colours.
        Mesh(
            vertices=self.vertices,
            faces=self.faces,
            vertex_colors=np.zeros((len(self.vertices), 3), dtype=np.uint8),
        )

    @property
    def vertex_count(self) -> int:
        return len(self.vertices)

    @property
    def face_count(self) -> int:
        return len(self.faces)


def transform(mesh: Mesh, matrix: npt.ArrayLike) -> Mesh:
    """Apply a linear 3x3 map to the vertices, keeping the winding outward.

    A mirror (negative determinant) turns counter-clockwise triangles clockwise, so for those the
    faces are reversed; otherwise every outward normal would point inward after the change.

    Args:
        mesh: The mesh to transform; it is not modified.
        matrix: (3, 3) matrix applied to column vectors (``p' = matrix @ p``); must be invertible.

    Returns:
        A new mesh with transformed float32 vertices, the same colours, and faces reversed only
        for an improper (mirroring) matrix.

    Raises:
        ValueError: If ``matrix`` is not a finite, invertible 3x3 matrix.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise ValueError(f"matrix must be a finite 3x3 array, got shape {m.shape}")
    det = float(np.linalg.det(m))
    if abs(det) < 1e-12:
        raise ValueError("matrix must be invertible (a singular map collapses the mesh)")
    # Row vectors: (m @ p.T).T == p @ m.T. float64 math, one cast back, so permutations are exact.
    vertices = (mesh.vertices.astype(np.float64) @ m.T).astype(np.float32)
    faces = mesh.faces[:, ::-1].copy() if det < 0 else mesh.faces
    return Mesh(vertices=vertices, faces=faces, vertex_colors=mesh.vertex_colors)


def transform_textured(mesh: TexturedMesh, matrix: npt.ArrayLike) -> TexturedMesh:
    """`transform` for a textured mesh: same geometry rule, UVs and texture unchanged."""
    moved = transform(
        Mesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=np.zeros((len(mesh.vertices), 3), np.uint8)),
        matrix,
    )
    return TexturedMesh(vertices=moved.vertices, faces=moved.faces, uvs=mesh.uvs, texture=mesh.texture)


def to_y_up(mesh: Mesh) -> Mesh:
    """Convert a mesh from TripoSR's native Z-up frame to the reference app's Y-up glTF frame.

    Applies ``NATIVE_TO_Y_UP``, which maps native ``(x, y, z)`` to ``(-y, z, -x)`` as the
    reference Gradio app does: native +Z (up) becomes +Y, native +X becomes -Z, native +Y becomes
    -X. It is a proper rotation (det +1), so winding stays outward.

    Args:
        mesh: A mesh in the native frame.

    Returns:
        A new mesh in the Y-up frame; faces and colours unchanged.
    """
    return transform(mesh, NATIVE_TO_Y_UP)

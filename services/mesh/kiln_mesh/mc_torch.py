"""Marching cubes in plain torch, on any device, with PyMCubes' exact triangulation.

PyMCubes (the CPU path of `kiln_mesh.extract`) is a compiled CPU-only wheel; on CUDA the grid
would otherwise have to travel to the host and be meshed by one CPU thread. This module does the
same work with vectorised tensor operations, so it runs wherever the volume lives and needs no
compiled extension.

The idea:

1. Case table. Rather than carrying a copy of the classic 256-case table, `build_case_table`
   derives it from PyMCubes itself on first use: for each corner sign pattern it meshes one
   2x2x2 cube with values -1/+1 and maps every returned vertex (an edge midpoint) back to its
   cube edge. Both paths thus share one convention, triangle order and winding included.
2. Classification, a slab of cells at a time along axis 0 (``slab + 1`` planes of the volume):
   each cell's case is the bit pattern of its corners at or below the iso-level, a few shifted
   comparisons of the whole slab; the table then gives each active cell's triangles as edges.
3. Vertices. Each cube edge is named by a global id, unique per grid edge; `torch.unique` with
   ``return_inverse`` turns the faces' edge ids into shared vertices (neighbouring cells use the
   same vertex, as in PyMCubes) and the crossing point on each distinct edge is interpolated
   once, with PyMCubes' formula and end order, so the positions agree to the last bit.

Conventions (checked against PyMCubes 0.1.6 by ``tests/unit/test_mc_torch.py``): vertices are
in array-index units in the array's axis order ``(i, j, k)``; the iso-level is rounded to
float32 (PyMCubes' argument type); a corner whose value equals it counts as below it; triangles
are counter-clockwise seen from the side below the iso-level. The faces come out in PyMCubes'
order (cells in C order, table order within a cell); the vertices are numbered by edge id
instead of creation order.
"""

from __future__ import annotations

import functools
from typing import Final

import mcubes  # type: ignore[import-untyped]  # PyMCubes ships no type information
import numpy as np
import numpy.typing as npt
import torch

__all__ = ["CORNERS", "EDGES", "build_case_table", "marching_cubes_torch"]

CORNERS: Final[tuple[tuple[int, int, int], ...]] = tuple((m >> 2 & 1, m >> 1 & 1, m & 1) for m in range(8))
"""Corner ``m`` of a cell is at offset ``CORNERS[m] = (di, dj, dk)``, i.e. ``m = 4 di + 2 dj + dk``
(C order of a 2x2x2 block). Bit ``m`` of a case is set when that corner is at or below the iso-level.
"""


def _edges() -> tuple[tuple[int, tuple[int, int, int]], ...]:
    edges = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for a in range(2):
            for b in range(2):
                start = [0, 0, 0]
                start[others[0]], start[others[1]] = a, b
                edges.append((axis, (start[0], start[1], start[2])))
    return tuple(edges)


EDGES: Final = _edges()
"""Edge ``e`` of a cell is ``EDGES[e] = (axis, start)``: from corner offset ``start`` one step
along ``axis``. ``e = 4 axis + 2 a + b`` with ``(a, b)`` the offsets along the other two axes in
increasing axis order.
"""

_MAX_TRIANGLES: Final = 5  # marching cubes never needs more than 5 triangles in one cell


@functools.lru_cache(maxsize=1)
def build_case_table() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Derive the marching cubes case table from PyMCubes.

    For each of the 256 cases one cube is meshed with PyMCubes: corner ``m`` (see `CORNERS`)
    gets -1 if bit ``m`` is set (below the iso-level 0) else +1, so every vertex PyMCubes returns
    is the exact midpoint of one cube edge (see `EDGES`).

    Returns:
        ``(triangles, counts)``: int64 ``[256, 15]``, per case up to 5 triangles as edge-index
        triples in PyMCubes' order and winding, padded with -1; int64 ``[256]`` triangle counts.
        Read-only arrays, cached after the first call.

    Raises:
        RuntimeError: If PyMCubes returns a vertex that is not an edge midpoint, a face that
            references no vertex or repeats an edge, more than 5 triangles in one cube, or
            triangles for a cube all below or all above the iso-level (or none for any other);
            then its conventions differ from what this module assumes.
    """
    edge_of = {
        tuple(float(c) + 0.5 * (axis == n) for n, c in enumerate(start)): e for e, (axis, start) in enumerate(EDGES)
    }
    triangles = np.full((256, 3 * _MAX_TRIANGLES), -1, dtype=np.int64)
    counts = np.zeros(256, dtype=np.int64)
    for case in range(256):
        below = np.array([case >> m & 1 for m in range(8)], dtype=bool).reshape(2, 2, 2)
        volume = np.where(below, -1.0, 1.0)
        vertices, faces = mcubes.marching_cubes(volume, 0.0)
        edges = []
        for vertex in np.asarray(vertices, dtype=np.float64).reshape(-1, 3).tolist():
            edge = edge_of.get(tuple(vertex))
            if edge is None:
                raise RuntimeError(f"PyMCubes case {case}: vertex {vertex} is not the midpoint of a cube edge")
            edges.append(edge)
        faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
        if faces.shape[0] > _MAX_TRIANGLES or (faces.size and (faces.min() < 0 or faces.max() >= len(edges))):
            raise RuntimeError(f"PyMCubes case {case}: unexpected faces {faces.tolist()} for {len(edges)} vertices")
        row = [edges[v] for v in faces.reshape(-1).tolist()]
        if any(len(set(row[t : t + 3])) != 3 for t in range(0, len(row), 3)):
            raise RuntimeError(f"PyMCubes case {case}: a triangle repeats an edge: {row}")
        if (faces.shape[0] == 0) != (case in (0, 255)):
            # The slab loop skips exactly the cells all below or all above the iso-level.
            raise RuntimeError(f"PyMCubes case {case}: {faces.shape[0]} triangles")
        triangles[case, : len(row)] = row
        counts[case] = faces.shape[0]
    triangles.flags.writeable = False
    counts.flags.writeable = False
    return triangles, counts


def marching_cubes_torch(
    volume: torch.Tensor,
    threshold: float,
    *,
    slab: int = 64,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extract the iso-surface ``volume == threshold``, like ``mcubes.marching_cubes``.

    Args:
        volume: ``[R0, R1, R2]`` real values on any device with float64 support (CPU, CUDA;
            each axis >= 2); not modified.
        threshold: Iso-level, rounded to float32 first as PyMCubes does. A value equal to it
            counts as below it.
        slab: Cells per slab along axis 0; bounds the working memory to a few byte-sized
            copies of ``slab + 1`` planes of the volume (comparisons and case indices), plus the
            output-sized face and vertex tensors.
        dtype: Floating dtype of the returned vertices. They are computed in float64 (like
            PyMCubes); ask for float64 to keep them exact, e.g. before further arithmetic.

    Returns:
        ``(vertices, faces)`` on the volume's device: ``[V, 3]`` positions in index units and
        axis order ``(i, j, k)``, and int64 ``[F, 3]`` triangles, counter-clockwise seen from
        the side below the iso-level. No vertex is duplicated; every vertex is used. Both empty
        if there is no surface.

    Raises:
        ValueError: On a bad shape, dtype or slab size.
    """
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise ValueError(f"volume must be 3-D with at least 2 samples per axis, got shape {tuple(volume.shape)}")
    if volume.is_complex() or volume.dtype == torch.bool:
        raise ValueError(f"volume must hold real numbers, got {volume.dtype}")
    if slab < 1:
        raise ValueError(f"slab must be >= 1, got {slab}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    device = volume.device
    r0, r1, r2 = (int(n) for n in volume.shape)
    # PyMCubes takes the iso-level as a C float (its Cython signature says `float`), i.e. rounds
    # it to float32, and then compares and interpolates in double.
    iso = float(np.float32(threshold))
    # Any float32 value compares with a float32 iso-level in float32 exactly as in double, so
    # float32 (and narrower) volumes are classified without a float64 copy of the slab.
    narrow = volume.dtype in (torch.float16, torch.bfloat16, torch.float32)
    compare_dtype = torch.float32 if narrow else torch.float64
    table_np, _ = build_case_table()
    table = torch.from_numpy(table_np.copy()).to(device)
    # Global edge id = axis * points + flat index of the edge's start point. A cell's edge e is
    # the cell's flat index plus a constant per e.
    points = r0 * r1 * r2
    edge_offset = torch.tensor(
        [axis * points + (s[0] * r1 + s[1]) * r2 + s[2] for axis, s in EDGES], dtype=torch.int64, device=device
    )
    face_edges = [torch.empty(0, dtype=torch.int64, device=device)]
    for start in range(0, r0 - 1, slab):
        stop = min(start + slab, r0 - 1)
        below = (volume[start : stop + 1].to(compare_dtype) <= iso).to(torch.uint8)
        # The case bits 4 di + 2 dj + dk, combined one axis at a time (3 uint8 passes, not 8).
        case = below[:, :, :-1] | below[:, :, 1:] << 1
        case = case[:, :-1] | case[:, 1:] << 2
        case = case[:-1] | case[1:] << 4
        del below
        # nonzero lists the cells in C order, so faces come out in PyMCubes' order.
        cells = torch.nonzero((case != 0) & (case != 255))
        if cells.shape[0] == 0:
            continue
        rows = table[case[cells[:, 0], cells[:, 1], cells[:, 2]].long()]
        del case
        cell_flat = ((cells[:, 0] + start) * r1 + cells[:, 1]) * r2 + cells[:, 2]
        ids = cell_flat[:, None] + edge_offset[rows.clamp(min=0)]
        face_edges.append(ids[rows >= 0])
    edge_ids, inverse = torch.unique(torch.cat(face_edges), return_inverse=True)
    faces = inverse.reshape(-1, 3)
    return _edge_vertices(volume, edge_ids, iso).to(dtype), faces


def _edge_vertices(volume: torch.Tensor, edge_ids: torch.Tensor, iso: float) -> torch.Tensor:
    """Float64 crossing point on each edge, bit for bit as PyMCubes computes it.

    PyMCubes interpolates ``x1 + (x2 - x1) * (iso - f1) / (f2 - f1)`` from the end ``x1`` (value
    ``f1``) where the cell that first meets the edge starts it. In its loop order that is the
    high end for axis-0 edges with ``j >= 1`` and for axis-1 edges with ``i == 0``, else the low
    end. The two ends round differently in the last bit, so the same end is used here. (Its
    ``f1 == f2`` midpoint branch never applies: an edge is only crossed between a value at or
    below the iso-level and one above it.)
    """
    r0, r1, r2 = (int(n) for n in volume.shape)
    points = r0 * r1 * r2
    axis, start = edge_ids // points, edge_ids % points
    i, j, k = start // (r1 * r2), start // r2 % r1, start % r2
    stride = torch.tensor([r1 * r2, r2, 1], dtype=torch.int64, device=volume.device)[axis]
    flat = volume.reshape(-1)
    low = flat[start].to(torch.float64)
    high = flat[start + stride].to(torch.float64)
    from_high = ((axis == 0) & (j >= 1)) | ((axis == 1) & (i == 0))
    f1 = torch.where(from_high, high, low)
    f2 = torch.where(from_high, low, high)
    direction = torch.where(from_high, -1.0, 1.0).to(torch.float64)
    vertices = torch.stack((i, j, k), dim=1).to(torch.float64)
    along = vertices.gather(1, axis[:, None]).squeeze(1) + from_high.to(torch.float64)
    # (x2 - x1) is +-1, so multiplying by it is exact, as in PyMCubes' expression.
    along = along + direction * (iso - f1) / (f2 - f1)
    return vertices.scatter(1, axis[:, None], along[:, None])

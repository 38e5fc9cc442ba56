"""Mesh extraction from a density field: grid queries, marching cubes, merging, vertex colours.

Follows TripoSR's ``extract_mesh`` conventions without its compiled torchmcubes
extension, the most common install failure of the original:

1. Grid: ``R`` samples per axis, ``t = linspace(0, 1, R)`` mapped to world units with
   ``t * 2r - r``, C order, index ``(i, j, k)`` <-> ``(x, y, z)``.
2. Density: queried in chunks of at most ``chunk_size`` points. The reference materialises all
   ``R**3`` points on the CPU up front (16.8 M at R = 256, 134 M at R = 512); here each chunk's
   points are generated for its range of flat indices directly on the query device, so memory is
   bounded by the chunk size plus the one float32 output volume on the CPU. With a
   CUDA device and this (host) path, each chunk's result is copied into the CPU volume; the
   provider uses the resident path below on CUDA instead.
3. Marching cubes on ``density - threshold`` at level 0, like the reference. On the CPU with
   PyMCubes (a registry wheel, nothing to compile); on CUDA with `kiln_mesh.mc_torch`, plain
   torch whose case table is derived from PyMCubes, so both give the same mesh bit for bit. The
   volume is not padded, so surfaces that reach the cube boundary stay open. PyMCubes rather
   than scikit-image: it is classic marching cubes like torchmcubes (scikit-image's default,
   Lewiner's method, triangulates ambiguous cells differently), it reads the float32 volume
   without a copy, and it needs nothing but numpy.
4. Vertices back to world units; triangles counter-clockwise seen from outside, where outside is
   density below the threshold.
5. trimesh-compatible vertex merging.
6. Vertex colours queried at the merged vertices, chunked like the density.

`extract_mesh_resident` is the same pipeline with every stage on the query device (the GPU):
the volume is filled slab by slab in device memory, meshed there with `kiln_mesh.mc_torch`,
merged and coloured there, and only the finished mesh is copied to the host.

Progress callbacks may raise (e.g. ``kiln_runtime.errors.Cancelled``) to stop the work between
chunks; the exception propagates and the partial volume is released.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from typing import Final

import mcubes  # type: ignore[import-untyped]  # PyMCubes ships no type information
import numpy as np
import numpy.typing as npt
import torch

from kiln_mesh.mc_torch import marching_cubes_torch
from kiln_mesh.mesh import Mesh

__all__ = [
    "ColorFn",
    "DensityFn",
    "EmptySurface",
    "ProgressFn",
    "density_grid",
    "extract_mesh",
    "extract_mesh_resident",
    "grid_points",
    "marching_cubes",
    "merge_vertices",
    "merge_vertices_torch",
    "resident_density_grid",
    "resident_marching_cubes",
    "resident_vertex_colors",
    "vertex_colors",
]

DensityFn = Callable[[torch.Tensor], torch.Tensor]
"""Points ``[N, 3]`` float32 on the query device -> activated density ``[N]`` (any float dtype)."""
ColorFn = Callable[[torch.Tensor], torch.Tensor]
"""Points ``[N, 3]`` float32 on the query device -> RGB ``[N, 3]`` in [0, 1]."""
ProgressFn = Callable[[int, int], None]
# (start, stop) -> activated density on grid rows start:stop (x index), shape [stop - start, R, R].
# Models whose features factor over the grid's axes (TripoSR's triplane) compute this much faster
# than point by point; the values must equal the point function's at the grid points.
SlabDensityFn = Callable[[int, int], torch.Tensor]
"""``(chunks_done, chunks_total)``; may raise to cancel, and the exception propagates."""

# trimesh merges vertices whose coordinates agree to tol.merge = 1e-8, i.e. 8 decimals; its key is
# round(vertex * 10**8) as int64, which is what merge_vertices reproduces.
_MERGE_DIGITS: Final = 8
# The grey used when no colour function is given (e.g. texture baking colours the mesh later).
_GREY: Final = 128
# Odd 64-bit multipliers for the fast merge key; see _unique_rows.
_HASH_MULTIPLIERS: Final = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64)
# Device types whose marching cubes runs in torch on the device (`kiln_mesh.mc_torch`); elsewhere
# PyMCubes on the CPU is faster than torch's CPU kernels. Tests add "cpu" to run the torch path.
_TORCH_MC_DEVICE_TYPES: frozenset[str] = frozenset({"cuda"})


class EmptySurface(ValueError):
    """The density never crosses the threshold inside the grid, so there is no surface to mesh."""


def _axis_coordinates(resolution: int, radius: float) -> torch.Tensor:
    """World coordinate of each grid index along one axis, float32 on the CPU.

    Computed on the CPU whatever the query device, as the reference does, so the
    grid is bit-identical on every device: ``linspace(0, 1, R) * (r - (-r)) + (-r)`` in float32.
    """
    t = torch.linspace(0.0, 1.0, resolution, dtype=torch.float32)
    return t * (radius - (-radius)) + (-radius)


def _check_grid_args(resolution: int, radius: float) -> None:
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius}")


def grid_points(resolution: int, radius: float) -> torch.Tensor:
    """All grid points at once, for tests and small resolutions.

    Args:
        resolution: Samples per axis, R >= 2.
        radius: Half-size of the cube; points span [-radius, radius] inclusive.

    Returns:
        ``[R**3, 3]`` float32 on the CPU in C order: row ``(i * R + j) * R + k`` is the point
        ``(x_i, y_j, z_k)``. These are exactly the points `density_grid` queries.
    """
    _check_grid_args(resolution, radius)
    axis = _axis_coordinates(resolution, radius)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack((x, y, z), dim=-1).reshape(-1, 3)


def density_grid(
    density: DensityFn,
    *,
    resolution: int,
    radius: float,
    chunk_size: int,
    device: str | torch.device = "cpu",
    on_chunk: ProgressFn | None = None,
) -> npt.NDArray[np.float32]:
    """Query the density at every grid point, chunk by chunk, into a CPU volume.

    Each chunk's points are generated on ``device`` from their flat C-order indices, so at most
    ``chunk_size`` points (and whatever ``density`` allocates for them) exist at a time; the
    full point grid is never materialised.

    Args:
        density: Activated density function (see `DensityFn`); called under
            ``torch.inference_mode`` with at most ``chunk_size`` points.
        resolution: Samples per axis, R >= 2.
        radius: Half-size of the cube in world units.
        chunk_size: Maximum points per density call, >= 1.
        device: Where the points are generated and the density is queried.
        on_chunk: Called with ``(k, total)`` after chunk ``k`` (1-based) is stored.

    Returns:
        ``(R, R, R)`` float32 volume with ``D[i, j, k]`` the density at ``(x_i, y_j, z_k)``.

    Raises:
        ValueError: On a bad argument, or if ``density`` returns the wrong number of values.
        Exception: Whatever ``density`` or ``on_chunk`` raises, unchanged.
    """
    _check_grid_args(resolution, radius)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    try:
        return _density_grid(density, resolution, radius, chunk_size, torch.device(device), on_chunk)
    except BaseException as exc:
        _release_frames(exc)
        raise


def slab_grid(
    slab_density: SlabDensityFn, *, resolution: int, rows: int, on_chunk: ProgressFn | None = None
) -> npt.NDArray[np.float32]:
    """Fill the (R, R, R) volume `rows` x-rows at a time from a `SlabDensityFn`."""
    volume = np.empty((resolution, resolution, resolution), dtype=np.float32)
    total = -(-resolution // rows)
    with torch.inference_mode():
        for index, start in enumerate(range(0, resolution, rows), start=1):
            stop = min(start + rows, resolution)
            slab = slab_density(start, stop)
            if tuple(slab.shape) != (stop - start, resolution, resolution):
                raise ValueError(f"slab density returned {tuple(slab.shape)} for rows {start}:{stop}")
            volume[start:stop] = slab.float().cpu().numpy()
            if on_chunk is not None:
                on_chunk(index, total)
    return volume


def _release_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames an exception's traceback keeps alive.

    A traceback holds every frame it passed through, and with them the partial volume (up to
    512 MB at R = 512) and the last chunk's device tensors, for as long as anyone holds the
    exception (a logger, a test, a retry loop). After an OOM or a cancel that memory must come
    back at once, so the work runs in a helper whose frame is cleared here; frames
    still executing (the caller's) are skipped by `traceback.clear_frames`.
    """
    traceback.clear_frames(exc.__traceback__)


def _density_grid(
    density: DensityFn,
    resolution: int,
    radius: float,
    chunk_size: int,
    device: torch.device,
    on_chunk: ProgressFn | None,
) -> npt.NDArray[np.float32]:
    volume = np.empty((resolution, resolution, resolution), dtype=np.float32)
    _fill_volume(volume.reshape(-1), density, resolution, radius, chunk_size, device, on_chunk)
    return volume


def _fill_volume(
    out: npt.NDArray[np.float32],
    density: DensityFn,
    resolution: int,
    radius: float,
    chunk_size: int,
    device: torch.device,
    on_chunk: ProgressFn | None,
) -> None:
    total_points = out.shape[0]
    chunks = -(-total_points // chunk_size)
    axis = _axis_coordinates(resolution, radius)
    xs = axis.tolist()  # float32 values, exact as Python floats
    # The (y, z) coordinates of one x-slab in C order, R**2 rows (2 MB at R = 512). A chunk is a
    # run of flat indices, i.e. pieces of consecutive slabs, so its points are slab-table slices
    # with x filled in: memory copies instead of per-point integer division and gathers, which
    # cost more than a cheap density function.
    y, z = torch.meshgrid(axis, axis, indexing="ij")
    slab = torch.stack((y, z), dim=-1).reshape(-1, 2).to(device)
    plane = resolution * resolution
    with torch.inference_mode():
        for chunk, start in enumerate(range(0, total_points, chunk_size), start=1):
            stop = min(start + chunk_size, total_points)
            points = torch.empty((stop - start, 3), dtype=torch.float32, device=device)
            position = start
            while position < stop:
                # Flat index (i * R + j) * R + k <-> (x_i, y_j, z_k): C order.
                i, offset = divmod(position, plane)
                end = min(stop, (i + 1) * plane)
                rows = slice(position - start, end - start)
                points[rows, 0] = xs[i]
                points[rows, 1:] = slab[offset : offset + end - position]
                position = end
            values = density(points)
            del points
            if values.numel() != stop - start:
                raise ValueError(
                    f"density returned {values.numel()} values (shape {tuple(values.shape)}) "
                    f"for {stop - start} points; expected one per point"
                )
            out[start:stop] = values.detach().reshape(-1).to("cpu", torch.float32).numpy()
            del values
            if on_chunk is not None:
                on_chunk(chunk, chunks)


def marching_cubes(
    volume: npt.NDArray[np.floating],
    *,
    threshold: float,
    radius: float,
    device: str | torch.device | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Extract the iso-surface ``density == threshold`` from a grid volume.

    Uses PyMCubes on the CPU; on a CUDA ``device``, `kiln_mesh.mc_torch.marching_cubes_torch`
    on that device, which gives the same world vertices bit for bit and the same faces in the
    same order (only the vertex numbering differs). Checked empirically (and pinned by tests on
    a sphere and an ellipsoid): PyMCubes returns vertices in array-index units in the array's
    own axis order (``(i, j, k)``, already TripoSR's ``(x, y, z)``; torchmcubes needed the
    reversal ``(k, j, i) -> (i, j, k)`` of the reference, PyMCubes does not), and its
    triangles are counter-clockwise seen from the side where the value is below the iso-level,
    which is TripoSR's outside. So no axis swap and no winding flip is needed.

    Args:
        volume: ``(Ri, Rj, Rk)`` densities on the grid of `grid_points` (each axis >= 2); not
            modified.
        threshold: Iso-level; inside is density above it.
        radius: Half-size of the cube in world units.
        device: Where marching cubes runs: a CUDA device runs it there in torch; None or any
            other device runs PyMCubes on the CPU.

    Returns:
        ``(vertices, faces)`` as numpy arrays: float32 ``(V, 3)`` world positions in
        ``(x, y, z)`` and int64 ``(F, 3)`` triangles, counter-clockwise seen from outside
        (normals point from high to low density). Both empty if there is no surface. Surfaces
        reaching the grid boundary stay open: the volume is not padded.

    Raises:
        ValueError: On a bad argument or if the volume contains NaN.
    """
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise ValueError(f"volume must be 3-D with at least 2 samples per axis, got shape {volume.shape}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    _check_grid_args(2, radius)
    # D - threshold at level 0, in float32, as the reference; this also makes
    # the copy that the clean-up below may modify.
    level = np.subtract(volume, np.float32(threshold), dtype=np.float32)
    if np.isnan(level).any():
        raise ValueError("the density volume contains NaN; the model produced invalid values")
    # exp() overflows to +inf for large raw densities; PyMCubes' interpolation turns
    # an infinite corner into NaN vertices. The largest float32 puts the vertex at the finite
    # corner instead, which is where an infinitely steep density crosses the threshold.
    big = np.finfo(np.float32).max
    np.clip(level, -big, big, out=level)
    if device is not None and torch.device(device).type in _TORCH_MC_DEVICE_TYPES:
        return _marching_cubes_torch(level, radius, torch.device(device))
    raw_vertices, raw_faces = mcubes.marching_cubes(level, 0.0)
    del level
    # Index units -> [0, 1] -> world, in float64 with one rounding to float32.
    scale = np.asarray(volume.shape, dtype=np.float64) - 1.0
    vertices = (np.asarray(raw_vertices, dtype=np.float64) / scale * (2.0 * radius) - radius).astype(np.float32)
    faces = np.asarray(raw_faces, dtype=np.int64).reshape(-1, 3)
    return vertices.reshape(-1, 3), faces


def _marching_cubes_torch(
    level: npt.NDArray[np.float32], radius: float, device: torch.device
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """`marching_cubes` on ``device`` in torch, from the prepared ``density - threshold`` volume."""
    with torch.inference_mode():
        vertices, faces = _world_marching_cubes(torch.from_numpy(level).to(device), radius)
        return vertices.cpu().numpy(), faces.cpu().numpy()


def _world_marching_cubes(level: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch marching cubes at level 0 of a prepared volume, vertices in world units, on its device."""
    # float64 index-unit vertices and the same world mapping as the PyMCubes path, operation
    # for operation, so the two agree to the last bit.
    raw_vertices, faces = marching_cubes_torch(level, 0.0, dtype=torch.float64)
    scale = torch.tensor(level.shape, dtype=torch.float64, device=level.device) - 1.0
    vertices = (raw_vertices / scale * (2.0 * radius) - radius).to(torch.float32)
    return vertices, faces


def merge_vertices(
    vertices: npt.NDArray[np.floating], faces: npt.NDArray[np.integer]
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.int64]]:
    """Merge vertices as ``trimesh.Trimesh(vertices, faces, process=True, validate=False)`` does.

    Vertices are keyed by ``round(v * 1e8)`` (agreement to 8 decimals); only vertices that a face
    references take part; the survivors keep the order of their first occurrence; faces are
    remapped. Degenerate faces are kept.

    Args:
        vertices: ``(V, 3)`` positions.
        faces: ``(F, 3)`` indices into ``vertices``.

    Returns:
        ``(vertices, faces)``: the kept rows of ``vertices`` (same dtype) and int64 faces.
    """
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if faces.size == 0 or vertices.shape[0] == 0:
        return vertices[:0], faces
    referenced = np.zeros(vertices.shape[0], dtype=bool)
    referenced[faces] = True
    used = np.flatnonzero(referenced)
    # Same key as trimesh.grouping.merge_vertices: float64 * 10**digits, rounded, int64.
    keys = np.rint(vertices[used].astype(np.float64) * 10.0**_MERGE_DIGITS).astype(np.int64)
    first, inverse = _unique_rows(keys)
    # Renumber groups by first occurrence (trimesh's keep_order=True).
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0], dtype=order.dtype)
    remap = np.zeros(vertices.shape[0], dtype=np.int64)
    remap[used] = rank[inverse]
    return vertices[used[first[order]]], remap[faces]


def _unique_rows(keys: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """First-occurrence index and inverse of the distinct rows of an ``(n, 3)`` int64 array.

    Exact, but fast: rows are first grouped by a wrapping 64-bit multiply-add hash (a 1-D unique
    is several times faster than a row-wise one on millions of vertices); if any group turns out
    to hold different rows (a hash collision, possible in principle) it falls back to an exact
    row-wise unique.
    """
    with np.errstate(over="ignore"):
        hashed = keys.view(np.uint64) @ _HASH_MULTIPLIERS
    _, first, inverse = np.unique(hashed, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    # Only rows grouped under another row's index can be wrong; typically few, so check just those.
    representative = first[inverse]
    others = np.flatnonzero(representative != np.arange(keys.shape[0]))
    if not np.array_equal(keys[others], keys[representative[others]]):
        rows = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).reshape(-1)
        _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    return first, inverse


def vertex_colors(
    color: ColorFn,
    vertices: npt.NDArray[np.floating],
    *,
    chunk_size: int,
    device: str | torch.device = "cpu",
    on_chunk: ProgressFn | None = None,
) -> npt.NDArray[np.uint8]:
    """Query the colour at each vertex, chunk by chunk, as uint8 RGB.

    Args:
        color: Colour function (see `ColorFn`); called under ``torch.inference_mode`` with at
            most ``chunk_size`` float32 points on ``device``.
        vertices: ``(V, 3)`` world positions.
        chunk_size: Maximum points per colour call, >= 1.
        device: Where the colour is queried.
        on_chunk: Called with ``(k, total)`` after chunk ``k`` (1-based).

    Returns:
        ``(V, 3)`` uint8: ``round(c * 255)`` clipped to [0, 255]; NaN becomes 0.

    Raises:
        ValueError: On a bad argument, or if ``color`` returns the wrong shape.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    count = vertices.shape[0]
    out = np.empty((count, 3), dtype=np.uint8)
    chunks = -(-count // chunk_size)
    target = torch.device(device)
    with torch.inference_mode():
        for chunk, start in enumerate(range(0, count, chunk_size), start=1):
            stop = min(start + chunk_size, count)
            points = torch.from_numpy(np.ascontiguousarray(vertices[start:stop], dtype=np.float32)).to(target)
            rgb = color(points)
            del points
            if tuple(rgb.shape) != (stop - start, 3):
                raise ValueError(f"color returned shape {tuple(rgb.shape)} for {stop - start} points; expected (N, 3)")
            values = rgb.detach().to("cpu", torch.float32).numpy()
            del rgb
            scaled = np.nan_to_num(np.rint(values * np.float32(255.0)), nan=0.0)
            out[start:stop] = np.clip(scaled, 0.0, 255.0).astype(np.uint8)
            if on_chunk is not None:
                on_chunk(chunk, chunks)
    return out


def extract_mesh(
    density: DensityFn,
    color: ColorFn | None,
    *,
    resolution: int,
    threshold: float,
    radius: float,
    chunk_size: int,
    device: str | torch.device = "cpu",
    on_chunk: ProgressFn | None = None,
    slab_density: SlabDensityFn | None = None,
) -> Mesh:
    """Density function -> coloured triangle mesh in TripoSR's native frame.

    Grid densities (`density_grid`), marching cubes (`marching_cubes`), trimesh-compatible
    merging (`merge_vertices`), then colours at the merged vertices (`vertex_colors`).

    Progress: ``on_chunk(done, total)`` with a fixed ``total`` = density chunks + 1; ``done``
    counts the density chunks and never decreases. The extra step stands for marching cubes,
    merging and colours: they report ``(total - 1, total)`` at each stage and colour chunk (so a
    cancel is honoured between them) and ``(total, total)`` once the mesh is complete.

    Args:
        density: Activated density function (see `DensityFn`).
        color: Colour function, or None for uniform grey (128, 128, 128).
        resolution: Grid samples per axis, >= 2.
        threshold: Density iso-level (TripoSR: 25.0).
        radius: Half-size of the cube in world units (TripoSR: 0.87).
        chunk_size: Maximum points per density or colour call.
        device: Where density and colour are queried; marching cubes runs there too on CUDA,
            else on the CPU (see `marching_cubes`).
        on_chunk: Progress callback; may raise to cancel.
        slab_density: Optional faster way to fill the grid, a slab of x rows at a time (about
            ``chunk_size`` points each); ``density`` is then not used for the grid.

    Returns:
        The mesh: float32 vertices in world units, int64 faces counter-clockwise seen from
        outside, uint8 vertex colours.

    Raises:
        EmptySurface: If the density never crosses ``threshold`` on the grid.
        ValueError: On a bad argument or invalid model output.
        Exception: Whatever ``density``, ``color`` or ``on_chunk`` raises, unchanged.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    _check_grid_args(resolution, radius)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    try:
        return _extract_mesh(
            density, color, resolution, threshold, radius, chunk_size, torch.device(device), on_chunk, slab_density
        )
    except BaseException as exc:
        _release_frames(exc)
        raise


def _extract_mesh(
    density: DensityFn,
    color: ColorFn | None,
    resolution: int,
    threshold: float,
    radius: float,
    chunk_size: int,
    device: torch.device,
    on_chunk: ProgressFn | None,
    slab_density: SlabDensityFn | None = None,
) -> Mesh:
    rows = max(1, chunk_size // (resolution * resolution))
    chunks = -(-resolution // rows) if slab_density is not None else -(-(resolution**3) // chunk_size)
    total = chunks + 1

    def report(done: int, _chunks: int = 0) -> None:
        if on_chunk is not None:
            on_chunk(done, total)

    def later_stage(_done: int = 0, _chunks: int = 0) -> None:
        report(total - 1)

    if slab_density is not None:
        volume = slab_grid(slab_density, resolution=resolution, rows=rows, on_chunk=report)
    else:
        volume = density_grid(
            density, resolution=resolution, radius=radius, chunk_size=chunk_size, device=device, on_chunk=report
        )
    vertices, faces = marching_cubes(volume, threshold=threshold, radius=radius, device=device)
    if faces.shape[0] == 0:
        low, high = float(volume.min()), float(volume.max())
        raise EmptySurface(
            f"no surface at threshold {threshold}: the density never crosses it (it ranges from {low:.4g} to "
            f"{high:.4g} on the grid); lower mc_threshold or check the input image"
        )
    del volume
    later_stage()
    vertices, faces = merge_vertices(vertices, faces)
    later_stage()
    if color is None:
        colors = np.full((vertices.shape[0], 3), _GREY, dtype=np.uint8)
    else:
        colors = vertex_colors(color, vertices, chunk_size=chunk_size, device=device, on_chunk=later_stage)
    mesh = Mesh(vertices=vertices.astype(np.float32, copy=False), faces=faces, vertex_colors=colors)
    report(total)
    return mesh


# --- the device-resident path -------------------------------------------------------------------
#
# On CUDA the path above would copy every density chunk to the host, copy the whole volume back
# for the torch marching cubes, and copy each colour chunk out again. The resident path keeps the
# volume, the raw mesh, the merge and the colours on the query device and copies the finished
# mesh to the host once. It is the same arithmetic (tests run it with device="cpu" and compare it
# with the functions above), so it gives the same mesh as the host path from the same volume.


def resident_density_grid(
    slab_density: SlabDensityFn,
    *,
    resolution: int,
    rows: int,
    device: str | torch.device,
    on_chunk: ProgressFn | None = None,
) -> torch.Tensor:
    """Fill an ``(R, R, R)`` float32 volume on ``device`` from a `SlabDensityFn`, ``rows`` x-rows a time.

    Nothing is copied to the host: each slab is written into the device volume, so the loop
    queues kernels without waiting for them (only ``on_chunk`` runs on the host in between).

    Args:
        slab_density: Density of x-rows ``start:stop``, ``[stop - start, R, R]`` on ``device``.
        resolution: Samples per axis, R >= 2.
        rows: x-rows per slab, >= 1 (a few million points per slab is fine on a GPU).
        device: Where the volume lives; the slabs must be there too.
        on_chunk: Called with ``(k, total)`` after slab ``k`` (1-based) is queued; may raise.

    Returns:
        The ``(R, R, R)`` float32 volume on ``device``.

    Raises:
        ValueError: On a bad argument or a slab of the wrong shape.
    """
    _check_grid_args(resolution, 1.0)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    volume = torch.empty((resolution, resolution, resolution), dtype=torch.float32, device=device)
    total = -(-resolution // rows)
    with torch.inference_mode():
        for index, start in enumerate(range(0, resolution, rows), start=1):
            stop = min(start + rows, resolution)
            slab = slab_density(start, stop)
            if tuple(slab.shape) != (stop - start, resolution, resolution):
                raise ValueError(f"slab density returned {tuple(slab.shape)} for rows {start}:{stop}")
            volume[start:stop] = slab  # cast to float32 in place, as .float() on the host path
            del slab
            if on_chunk is not None:
                on_chunk(index, total)
    return volume


def resident_marching_cubes(
    volume: torch.Tensor, *, threshold: float, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`marching_cubes` on the volume's own device with `kiln_mesh.mc_torch`, results left there.

    The same preparation as `marching_cubes` (``density - threshold`` in float32, NaN refused,
    infinities clipped to the largest float32) and the same world mapping, so the vertices equal
    the PyMCubes path's bit for bit (faces in the same order, vertices numbered differently).

    Args:
        volume: ``(Ri, Rj, Rk)`` densities on any device (each axis >= 2); not modified.
        threshold: Iso-level; inside is density above it.
        radius: Half-size of the cube in world units.

    Returns:
        ``(vertices, faces)`` on the volume's device: float32 ``(V, 3)`` world positions and int64
        ``(F, 3)`` triangles, counter-clockwise seen from outside. Both empty if there is no surface.

    Raises:
        ValueError: On a bad argument or if the volume contains NaN.
    """
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise ValueError(f"volume must be 3-D with at least 2 samples per axis, got shape {tuple(volume.shape)}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    _check_grid_args(2, radius)
    with torch.inference_mode():
        # The float32 threshold as a tensor, so the subtraction is float32 - float32 as in numpy.
        level = volume.to(torch.float32) - torch.tensor(np.float32(threshold), device=volume.device)
        if bool(torch.isnan(level).any()):  # one small device-to-host read
            raise ValueError("the density volume contains NaN; the model produced invalid values")
        big = float(np.finfo(np.float32).max)
        level.clamp_(-big, big)
        return _world_marching_cubes(level, radius)


def merge_vertices_torch(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_vertices` in torch on the tensors' device: the same vertices and faces, same order.

    Args:
        vertices: ``(V, 3)`` positions.
        faces: ``(F, 3)`` indices into ``vertices``.

    Returns:
        ``(vertices, faces)``: the kept rows of ``vertices`` and int64 faces, equal to what
        `merge_vertices` returns for the same arrays.
    """
    faces = faces.to(torch.int64).reshape(-1, 3)
    if faces.numel() == 0 or vertices.shape[0] == 0:
        return vertices[:0], faces
    device = vertices.device
    referenced = torch.zeros(vertices.shape[0], dtype=torch.bool, device=device)
    referenced[faces.reshape(-1)] = True
    used = torch.nonzero(referenced).squeeze(1)
    # trimesh's key: float64 * 10**digits rounded half to even (np.rint and torch.round agree).
    keys = torch.round(vertices[used].to(torch.float64) * 10.0**_MERGE_DIGITS).to(torch.int64)
    groups, inverse = torch.unique(keys, dim=0, return_inverse=True)
    count = groups.shape[0]
    # First occurrence of each group (np.unique's return_index), then groups renumbered by it.
    positions = torch.arange(used.shape[0], dtype=torch.int64, device=device)
    first = torch.full((count,), used.shape[0], dtype=torch.int64, device=device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    order = torch.argsort(first, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, dtype=torch.int64, device=device)
    remap = torch.zeros(vertices.shape[0], dtype=torch.int64, device=device)
    remap[used] = rank[inverse]
    return vertices[used[first[order]]], remap[faces]


def resident_vertex_colors(
    color: ColorFn, vertices: torch.Tensor, *, chunk_size: int, on_chunk: ProgressFn | None = None
) -> torch.Tensor:
    """`vertex_colors` with the vertices and the result on the vertices' device.

    Chunks are as large as ``chunk_size`` (on a GPU, usually all vertices in one call) and each
    result is converted to uint8 where it was computed; nothing is copied to the host.

    Returns:
        ``(V, 3)`` uint8 on the vertices' device: ``round(c * 255)`` clipped to [0, 255], NaN -> 0.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    count = vertices.shape[0]
    out = torch.empty((count, 3), dtype=torch.uint8, device=vertices.device)
    chunks = -(-count // chunk_size)
    with torch.inference_mode():
        for chunk, start in enumerate(range(0, count, chunk_size), start=1):
            stop = min(start + chunk_size, count)
            rgb = color(vertices[start:stop].to(torch.float32))
            if tuple(rgb.shape) != (stop - start, 3):
                raise ValueError(f"color returned shape {tuple(rgb.shape)} for {stop - start} points; expected (N, 3)")
            # float32 * 255 then round half to even, as np.rint on the host path.
            scaled = torch.nan_to_num(torch.round(rgb.to(torch.float32) * 255.0), nan=0.0)
            out[start:stop] = scaled.clamp_(0.0, 255.0).to(torch.uint8)
            del rgb, scaled
            if on_chunk is not None:
                on_chunk(chunk, chunks)
    return out


def extract_mesh_resident(
    slab_density: SlabDensityFn,
    color: ColorFn | None,
    *,
    resolution: int,
    threshold: float,
    radius: float,
    slab_points: int,
    device: str | torch.device,
    on_chunk: ProgressFn | None = None,
) -> Mesh:
    """`extract_mesh` with everything on ``device`` and one copy of the finished mesh to the host.

    Grid (`resident_density_grid`, x-slabs of about ``slab_points`` points), marching cubes
    (`resident_marching_cubes`, `kiln_mesh.mc_torch`), merging (`merge_vertices_torch`) and
    colours (`resident_vertex_colors`, ``slab_points`` vertices per call) all stay on ``device``.
    Progress follows `extract_mesh`: ``total`` = slabs + 1, the later stages report
    ``(total - 1, total)``, the end ``(total, total)``.

    Returns:
        The mesh as `extract_mesh` returns it. From the same volume the vertices, faces and
        colours equal the host path's with the torch marching cubes (see `marching_cubes`).

    Raises:
        EmptySurface: If the density never crosses ``threshold`` on the grid.
        ValueError: On a bad argument or invalid model output.
        Exception: Whatever ``slab_density``, ``color`` or ``on_chunk`` raises, unchanged.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    _check_grid_args(resolution, radius)
    if slab_points < 1:
        raise ValueError(f"slab_points must be >= 1, got {slab_points}")
    try:
        return _extract_mesh_resident(
            slab_density, color, resolution, threshold, radius, slab_points, torch.device(device), on_chunk
        )
    except BaseException as exc:
        _release_frames(exc)
        raise


def _extract_mesh_resident(
    slab_density: SlabDensityFn,
    color: ColorFn | None,
    resolution: int,
    threshold: float,
    radius: float,
    slab_points: int,
    device: torch.device,
    on_chunk: ProgressFn | None,
) -> Mesh:
    rows = max(1, slab_points // (resolution * resolution))
    total = -(-resolution // rows) + 1

    def report(done: int, _chunks: int = 0) -> None:
        if on_chunk is not None:
            on_chunk(done, total)

    def later_stage(_done: int = 0, _chunks: int = 0) -> None:
        report(total - 1)

    with torch.inference_mode():
        volume = resident_density_grid(slab_density, resolution=resolution, rows=rows, device=device, on_chunk=report)
        vertices, faces = resident_marching_cubes(volume, threshold=threshold, radius=radius)
        if faces.shape[0] == 0:
            low, high = float(volume.min()), float(volume.max())
            raise EmptySurface(
                f"no surface at threshold {threshold}: the density never crosses it (it ranges from {low:.4g} to "
                f"{high:.4g} on the grid); lower mc_threshold or check the input image"
            )
        del volume
        later_stage()
        vertices, faces = merge_vertices_torch(vertices, faces)
        later_stage()
        if color is None:
            colors = torch.full((vertices.shape[0], 3), _GREY, dtype=torch.uint8, device=device)
        else:
            colors = resident_vertex_colors(color, vertices, chunk_size=slab_points, on_chunk=later_stage)
        # The one copy of the mesh to the host.
        mesh = Mesh(vertices=vertices.cpu().numpy(), faces=faces.cpu().numpy(), vertex_colors=colors.cpu().numpy())
    report(total)
    return mesh

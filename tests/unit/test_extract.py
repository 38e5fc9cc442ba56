"""Mesh extraction: grid, chunked density queries, marching cubes conventions, merging, colours."""

from __future__ import annotations

import math
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch
import trimesh

from kiln_mesh.extract import (
    EmptySurface,
    _unique_rows,
    density_grid,
    extract_mesh,
    grid_points,
    marching_cubes,
    merge_vertices,
    vertex_colors,
)
from kiln_mesh.mesh import Mesh
from kiln_runtime.errors import Cancelled

RADIUS = 0.87  # TripoSR's cube half-size
THRESHOLD = 25.0
CENTRE = (0.1, -0.05, 0.2)
SPHERE_R = 0.5


def sphere_density(centre: tuple[float, float, float] = CENTRE, radius: float = SPHERE_R):
    c = torch.tensor(centre)

    def density(points: torch.Tensor) -> torch.Tensor:
        # 25 exactly on the sphere, rising smoothly inside (50 at 0.07 in) and falling outside.
        return THRESHOLD * torch.exp(-((points - c).norm(dim=-1) - radius) * 10.0)

    return density


def ellipsoid_density(centre: tuple[float, float, float], radii: tuple[float, float, float]):
    c, r = torch.tensor(centre), torch.tensor(radii)

    def density(points: torch.Tensor) -> torch.Tensor:
        return THRESHOLD * torch.exp(-(((points - c) / r).norm(dim=-1) - 1.0) * 3.0)

    return density


def voxel(resolution: int) -> float:
    return 2.0 * RADIUS / (resolution - 1)


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    v = vertices.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def edge_use(faces: np.ndarray) -> Counter[tuple[int, int]]:
    """How many faces use each undirected edge."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return Counter(map(tuple, np.sort(edges, axis=1).tolist()))


# --- grid --------------------------------------------------------------------------------------


def test_grid_points_c_order_and_world_mapping() -> None:
    r = 5
    points = grid_points(r, RADIUS)
    assert points.shape == (r**3, 3) and points.dtype == torch.float32
    step = 2 * RADIUS / (r - 1)
    # Row (i * R + j) * R + k is (x_i, y_j, z_k): k varies fastest, i slowest.
    np.testing.assert_allclose(points[0].numpy(), [-RADIUS] * 3, atol=1e-7)
    np.testing.assert_allclose(points[1].numpy(), [-RADIUS, -RADIUS, -RADIUS + step], atol=1e-6)
    np.testing.assert_allclose(points[r].numpy(), [-RADIUS, -RADIUS + step, -RADIUS], atol=1e-6)
    np.testing.assert_allclose(points[r * r].numpy(), [-RADIUS + step, -RADIUS, -RADIUS], atol=1e-6)
    np.testing.assert_allclose(points[-1].numpy(), [RADIUS] * 3, atol=1e-7)
    # The reference's float32 formula, bit for bit.
    t = torch.linspace(0, 1, r, dtype=torch.float32)
    assert torch.equal(points[:r, 2], t * (RADIUS - (-RADIUS)) + (-RADIUS))


@pytest.mark.parametrize("chunk_size", [1000, 5000, 1 << 20])
def test_density_grid_is_the_density_at_grid_points(chunk_size: int) -> None:
    r = 24  # 576 points per x-slab: chunks of 1000 and 5000 start and end mid-slab
    points = grid_points(r, RADIUS)

    def code(p: torch.Tensor) -> torch.Tensor:  # distinct per point, so any misplacement shows
        return p[:, 0] * 1e4 + p[:, 1] * 1e2 + p[:, 2]

    volume = density_grid(code, resolution=r, radius=RADIUS, chunk_size=chunk_size)
    assert volume.shape == (r, r, r) and volume.dtype == np.float32
    np.testing.assert_array_equal(volume, code(points).numpy().reshape(r, r, r))
    # D[i, j, k] is the density at (x_i, y_j, z_k).
    xs = grid_points(r, RADIUS)[:r, 2].numpy()
    assert volume[3, 0, 0] == np.float32(np.float32(xs[3] * 1e4) + np.float32(xs[0] * 1e2)) + xs[0]


def test_chunking_does_not_change_volume_or_mesh() -> None:
    density = sphere_density()
    small = density_grid(density, resolution=64, radius=RADIUS, chunk_size=1000)
    large = density_grid(density, resolution=64, radius=RADIUS, chunk_size=1 << 20)
    np.testing.assert_allclose(small, large, rtol=1e-6, atol=1e-6)
    a = extract_mesh(density, None, resolution=64, threshold=THRESHOLD, radius=RADIUS, chunk_size=1000)
    b = extract_mesh(density, None, resolution=64, threshold=THRESHOLD, radius=RADIUS, chunk_size=1 << 20)
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.faces, b.faces)


def test_density_grid_never_exceeds_chunk_size() -> None:
    sizes: list[int] = []

    def spy(points: torch.Tensor) -> torch.Tensor:
        assert points.dtype == torch.float32 and points.ndim == 2 and points.shape[1] == 3
        sizes.append(points.shape[0])
        return points[:, 0]

    density_grid(spy, resolution=256, radius=RADIUS, chunk_size=65536)
    assert max(sizes) <= 65536
    assert sum(sizes) == 256**3


def test_density_may_return_lower_precision_and_column_shape() -> None:
    def half(points: torch.Tensor) -> torch.Tensor:
        return sphere_density()(points).to(torch.float16)[:, None]

    volume = density_grid(half, resolution=16, radius=RADIUS, chunk_size=1000)
    assert volume.dtype == np.float32
    expected = sphere_density()(grid_points(16, RADIUS)).to(torch.float16).float().numpy().reshape(16, 16, 16)
    np.testing.assert_array_equal(volume, expected)


def test_density_with_wrong_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="one per point"):
        density_grid(lambda p: p, resolution=8, radius=RADIUS, chunk_size=100)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolution": 1, "radius": RADIUS, "chunk_size": 10},
        {"resolution": 8, "radius": 0.0, "chunk_size": 10},
        {"resolution": 8, "radius": RADIUS, "chunk_size": 0},
    ],
)
def test_density_grid_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        density_grid(sphere_density(), **kwargs)  # type: ignore[arg-type]


# --- progress and cancellation -----------------------------------------------------------------


def test_density_grid_reports_each_chunk() -> None:
    calls: list[tuple[int, int]] = []
    density_grid(
        sphere_density(), resolution=32, radius=RADIUS, chunk_size=1000, on_chunk=lambda k, n: calls.append((k, n))
    )
    assert calls == [(k, 33) for k in range(1, 34)]  # 32**3 = 32768 points -> 33 chunks


def test_extract_mesh_progress_is_monotonic_and_ends_complete() -> None:
    calls: list[tuple[int, int]] = []
    extract_mesh(
        sphere_density(),
        lambda p: torch.full_like(p, 0.5),
        resolution=32,
        threshold=THRESHOLD,
        radius=RADIUS,
        chunk_size=1000,
        on_chunk=lambda k, n: calls.append((k, n)),
    )
    totals = {n for _, n in calls}
    assert totals == {34}  # 33 density chunks + 1 for marching cubes, merging and colours
    done = [k for k, _ in calls]
    assert done == sorted(done)
    assert done[:33] == list(range(1, 34))
    assert calls[-1] == (34, 34)
    assert done.count(34) == 1  # "complete" only once the mesh exists


@pytest.mark.parametrize("cancel_at", [3, 32])  # of 32 chunks
def test_cancel_propagates_and_frees_the_volume(cancel_at: int) -> None:
    queried: list[int] = []

    def density(points: torch.Tensor) -> torch.Tensor:
        queried.append(points.shape[0])
        return sphere_density()(points)

    def on_chunk(done: int, total: int) -> None:
        if done == cancel_at:
            raise Cancelled("client went away")

    resolution = 128  # an 8 MB float32 volume
    tracemalloc.start()
    try:
        with pytest.raises(Cancelled) as info:
            density_grid(density, resolution=resolution, radius=RADIUS, chunk_size=65536, on_chunk=on_chunk)
        # The exception (and its traceback) is still alive here; the volume must not be.
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.message == "client went away"
    assert len(queried) == cancel_at  # no chunk after the cancel
    assert held < resolution**3 * 4 // 2


def test_cancel_during_colours_propagates() -> None:
    seen: list[tuple[int, int]] = []

    def on_chunk(done: int, total: int) -> None:
        seen.append((done, total))
        if done == total - 1 and len(seen) > total:  # in the colour stage
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        extract_mesh(
            sphere_density(),
            lambda p: torch.full_like(p, 0.5),
            resolution=32,
            threshold=THRESHOLD,
            radius=RADIUS,
            chunk_size=1000,
            on_chunk=on_chunk,
        )
    assert seen[-1][0] < seen[-1][1]


def test_density_errors_propagate() -> None:
    def broken(points: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        extract_mesh(broken, None, resolution=16, threshold=THRESHOLD, radius=RADIUS, chunk_size=100)


# --- marching cubes conventions ----------------------------------------------------------------


@pytest.mark.parametrize("resolution", [64, 128])
def test_sphere_through_extract_mesh(resolution: int) -> None:
    mesh = extract_mesh(
        sphere_density(), None, resolution=resolution, threshold=THRESHOLD, radius=RADIUS, chunk_size=1 << 16
    )
    assert isinstance(mesh, Mesh)
    v, f = mesh.vertices, mesh.faces
    assert v.dtype == np.float32 and f.dtype == np.int64
    assert (mesh.vertex_colors == 128).all()
    centre = np.asarray(CENTRE)

    # Every vertex on the sphere (interpolation error well under one voxel), centred right.
    dist = np.linalg.norm(v - centre, axis=1)
    assert np.abs(dist - SPHERE_R).max() < voxel(resolution)
    np.testing.assert_allclose(v.mean(axis=0), centre, atol=voxel(resolution) / 4)

    # Outward winding: normals point away from the centre (from high to low density).
    tri = v[f].astype(np.float64)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = np.einsum("ij,ij->i", normals, tri.mean(axis=1) - centre) > 0
    assert outward.mean() > 0.999
    volume = signed_volume(v, f)
    assert volume == pytest.approx(4.0 / 3.0 * math.pi * SPHERE_R**3, rel=0.03)

    # Closed: every edge shared by exactly two faces.
    assert set(edge_use(f).values()) == {2}


def test_axis_order_of_an_ellipsoid() -> None:
    centre, radii = (0.2, -0.1, 0.05), (0.3, 0.2, 0.45)
    mesh = extract_mesh(
        ellipsoid_density(centre, radii), None, resolution=64, threshold=THRESHOLD, radius=RADIUS, chunk_size=1 << 16
    )
    v = mesh.vertices
    extents = v.max(axis=0) - v.min(axis=0)
    np.testing.assert_allclose(extents, 2 * np.asarray(radii), atol=2 * voxel(64))
    np.testing.assert_allclose((v.max(axis=0) + v.min(axis=0)) / 2, centre, atol=voxel(64))
    assert signed_volume(v, mesh.faces) == pytest.approx(4.0 / 3.0 * math.pi * np.prod(radii), rel=0.03)


def test_marching_cubes_on_a_hand_built_volume() -> None:
    # One x-slab above the threshold: the surface lies halfway between grid points, at the
    # right x, with normals along -x and +x.
    r = 5
    volume = np.zeros((r, r, r), dtype=np.float32)
    volume[2] = 2 * THRESHOLD
    v, f = marching_cubes(volume, threshold=THRESHOLD, radius=1.0)
    assert v.dtype == np.float32 and f.dtype == np.int64
    step = 2.0 / (r - 1)
    np.testing.assert_allclose(np.unique(v[:, 0]), [-1 + 1.5 * step, -1 + 2.5 * step], atol=1e-6)
    tri = v[f].astype(np.float64)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    on_left = tri[:, :, 0].mean(axis=1) < 0
    assert (normals[on_left, 0] < 0).all() and (normals[~on_left, 0] > 0).all()
    np.testing.assert_allclose(normals[:, 1:], 0, atol=1e-9)


def test_surface_touching_the_boundary_stays_open() -> None:
    # A sphere centred on the x = +r face: only the half inside the cube exists, and no cap.
    mesh = extract_mesh(
        sphere_density(centre=(RADIUS, 0.0, 0.0)),
        None,
        resolution=48,
        threshold=THRESHOLD,
        radius=RADIUS,
        chunk_size=1 << 16,
    )
    uses = edge_use(mesh.faces)
    border = [edge for edge, n in uses.items() if n == 1]
    assert border and set(uses.values()) <= {1, 2}
    border_vertices = np.unique(np.asarray(border))
    np.testing.assert_allclose(mesh.vertices[border_vertices, 0], RADIUS, atol=1e-6)
    # No vertex on the open side beyond the grid.
    assert mesh.vertices[:, 0].max() <= RADIUS + 1e-6


def test_infinite_density_gives_finite_vertices() -> None:
    c = torch.tensor(CENTRE)

    def overflowing(points: torch.Tensor) -> torch.Tensor:  # exp() overflow inside
        return torch.where((points - c).norm(dim=-1) < SPHERE_R, torch.inf, 0.0)

    mesh = extract_mesh(overflowing, None, resolution=32, threshold=THRESHOLD, radius=RADIUS, chunk_size=4096)
    dist = np.linalg.norm(mesh.vertices - np.asarray(CENTRE), axis=1)
    assert np.abs(dist - SPHERE_R).max() < voxel(32)


def test_nan_density_is_rejected() -> None:
    volume = np.full((4, 4, 4), 30.0, dtype=np.float32)
    volume[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        marching_cubes(volume, threshold=THRESHOLD, radius=RADIUS)


@pytest.mark.parametrize("level", [1.0, 100.0])
def test_no_crossing_raises_empty_surface(level: float) -> None:
    with pytest.raises(EmptySurface, match=r"no surface at threshold 25\.0: the density never crosses it") as info:
        extract_mesh(
            lambda p: torch.full((p.shape[0],), level),
            None,
            resolution=16,
            threshold=25.0,
            radius=RADIUS,
            chunk_size=1000,
        )
    assert isinstance(info.value, ValueError)
    assert "lower mc_threshold or check the input image" in str(info.value)


def test_marching_cubes_without_surface_is_empty() -> None:
    v, f = marching_cubes(np.zeros((8, 8, 8), np.float32), threshold=THRESHOLD, radius=RADIUS)
    assert v.shape == (0, 3) and f.shape == (0, 3)


# --- merging -----------------------------------------------------------------------------------


def duplicated_mesh(dtype: type[np.floating]) -> tuple[np.ndarray, np.ndarray]:
    """A sphere as 'triangle soup' (3 vertices per face, like torchmcubes on CUDA) plus traps."""
    v, f = marching_cubes(
        density_grid(sphere_density(), resolution=20, radius=RADIUS, chunk_size=1 << 16),
        threshold=THRESHOLD,
        radius=RADIUS,
    )
    soup = v[f].reshape(-1, 3).astype(dtype)
    faces = np.arange(len(soup)).reshape(-1, 3)
    rng = np.random.default_rng(0)
    extra = soup[rng.choice(len(soup), 40)]
    nudged_same = extra[:20] + dtype(3e-10)  # rounds to the same 8 decimals: merged (usually)
    nudged_apart = extra[20:] + dtype(3e-6)  # clearly different: kept
    unreferenced = rng.random((10, 3)).astype(dtype)
    vertices = np.concatenate([unreferenced[:5], soup, nudged_same, nudged_apart, unreferenced[5:]])
    base = 5
    new_ids = base + len(soup) + np.arange(40)
    more_faces = np.stack([new_ids[:20], new_ids[20:], new_ids[:20][::-1]], axis=1)
    degenerate = np.array([[base, base, base + 1]])  # kept, as trimesh keeps it with validate=False
    return vertices, np.concatenate([faces + base, more_faces, degenerate]).astype(np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_vertices_matches_trimesh(dtype: type[np.floating]) -> None:
    vertices, faces = duplicated_mesh(dtype)
    merged_v, merged_f = merge_vertices(vertices, faces)
    reference = trimesh.Trimesh(vertices=vertices, faces=faces, process=True, validate=False)
    assert len(merged_v) < len(vertices) // 2  # the soup really had duplicates
    assert merged_v.dtype == dtype and merged_f.dtype == np.int64
    np.testing.assert_array_equal(merged_v.astype(np.float64), reference.vertices)
    np.testing.assert_array_equal(merged_f, reference.faces)
    assert len(merged_f) == len(faces)  # degenerate faces are not removed


def test_merge_vertices_keeps_first_occurrence_order() -> None:
    v = np.array([[9, 9, 9], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    f = np.array([[1, 2, 3], [3, 4, 2]])
    merged_v, merged_f = merge_vertices(v, f)
    np.testing.assert_array_equal(merged_v, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(merged_f, [[0, 1, 0], [0, 2, 1]])


def test_unique_rows_is_exact_on_a_hash_collision() -> None:
    from kiln_mesh.extract import _HASH_MULTIPLIERS

    m0, m1 = (int(m) for m in _HASH_MULTIPLIERS[:2])

    def wrap(x: int) -> int:
        return (x + 2**63) % 2**64 - 2**63

    # (a, b, c) and (a + m1, b - m0, c) hash alike: (a + m1) * m0 + (b - m0) * m1 = a * m0 + b * m1.
    keys = np.array([[1, 2, 3], [wrap(1 + m1), wrap(2 - m0), 3], [1, 2, 3]], dtype=np.int64)
    hashed = keys.view(np.uint64) @ _HASH_MULTIPLIERS
    assert hashed[0] == hashed[1]  # the collision is real
    first, inverse = _unique_rows(keys)
    np.testing.assert_array_equal(keys[first][inverse], keys)
    assert len(first) == 2


# --- colours -----------------------------------------------------------------------------------


def test_vertex_colors_encode_position() -> None:
    rng = np.random.default_rng(1)
    vertices = rng.uniform(-RADIUS, RADIUS, (1001, 3)).astype(np.float32)

    def position_colour(points: torch.Tensor) -> torch.Tensor:
        return (points + RADIUS) / (2 * RADIUS)

    colours = vertex_colors(position_colour, vertices, chunk_size=97, device="cpu")
    expected = np.rint((vertices + np.float32(RADIUS)) / np.float32(2 * RADIUS) * np.float32(255)).astype(np.uint8)
    assert colours.dtype == np.uint8
    np.testing.assert_array_equal(colours, expected)


def test_vertex_colors_clip_and_nan() -> None:
    values = torch.tensor([[-0.5, 1.5, float("nan")], [0.5, 1.0, 0.0]])
    colours = vertex_colors(lambda p: values[: p.shape[0]], np.zeros((2, 3), np.float32), chunk_size=10, device="cpu")
    np.testing.assert_array_equal(colours, [[0, 255, 0], [128, 255, 0]])


def test_extract_mesh_colours_at_the_vertices() -> None:
    def position_colour(points: torch.Tensor) -> torch.Tensor:
        return (points + RADIUS) / (2 * RADIUS)

    mesh = extract_mesh(
        sphere_density(), position_colour, resolution=32, threshold=THRESHOLD, radius=RADIUS, chunk_size=500
    )
    expected = np.rint((mesh.vertices + np.float32(RADIUS)) / np.float32(2 * RADIUS) * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(mesh.vertex_colors, expected)


def test_colour_with_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        vertex_colors(lambda p: p[:, 0], np.zeros((4, 3), np.float32), chunk_size=10, device="cpu")


def test_slab_density_gives_the_same_mesh_as_the_point_function() -> None:
    density = sphere_density()
    resolution = 48
    axis = torch.linspace(0.0, 1.0, resolution) * (RADIUS - (-RADIUS)) + (-RADIUS)
    calls: list[tuple[int, int]] = []

    def slab(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        grid = torch.stack(torch.meshgrid(axis[start:stop], axis, axis, indexing="ij"), dim=-1)
        return density(grid.reshape(-1, 3)).reshape(stop - start, resolution, resolution)

    reports: list[tuple[int, int]] = []
    common = {"resolution": resolution, "threshold": 25.0, "radius": RADIUS, "chunk_size": 5 * resolution**2}
    by_points = extract_mesh(density, None, **common)
    by_slabs = extract_mesh(density, None, slab_density=slab, on_chunk=lambda d, t: reports.append((d, t)), **common)
    np.testing.assert_array_equal(by_slabs.vertices, by_points.vertices)
    np.testing.assert_array_equal(by_slabs.faces, by_points.faces)
    assert calls[0] == (0, 5) and calls[-1] == (45, 48)  # 5 rows per slab: about chunk_size points
    assert reports[-1] == (11, 11)  # 10 slabs + the meshing step

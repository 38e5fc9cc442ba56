"""Torch marching cubes: same mesh as PyMCubes, on the CPU here and on CUDA where there is one."""

from __future__ import annotations

import mcubes
import numpy as np
import pytest
import torch

from kiln_mesh import extract
from kiln_mesh.extract import marching_cubes, merge_vertices
from kiln_mesh.mc_torch import CORNERS, EDGES, build_case_table, marching_cubes_torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(volume: np.ndarray, iso: float) -> tuple[np.ndarray, np.ndarray]:
    vertices, faces = mcubes.marching_cubes(volume, iso)
    return np.asarray(vertices, np.float64).reshape(-1, 3), np.asarray(faces, np.int64).reshape(-1, 3)


def torch_mc(volume: np.ndarray, iso: float, *, slab: int = 64, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    vertices, faces = marching_cubes_torch(torch.from_numpy(volume).to(device), iso, slab=slab, dtype=torch.float64)
    assert vertices.device.type == faces.device.type == torch.device(device).type
    assert vertices.dtype == torch.float64 and faces.dtype == torch.int64
    return vertices.cpu().numpy(), faces.cpu().numpy()


def face_triples(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces as ``[F, 9]`` coordinate rows, each its lexicographically smallest rotation, sorted.

    Rotation keeps the winding, so two meshes compare equal iff they have the same triangles with
    the same orientation, whatever the vertex numbering and face order. Rotating by coordinates
    rather than vertex ids keeps this canonical when distinct vertices coincide (corners at the
    level).
    """
    rotations = np.stack([vertices[np.roll(faces, -r, axis=1)].reshape(-1, 9) for r in range(3)], axis=1)
    flat = rotations.reshape(-1, 9)
    rank = np.empty(flat.shape[0], np.int64)
    rank[np.lexsort(flat.T[::-1])] = np.arange(flat.shape[0])
    best = np.argmin(rank.reshape(-1, 3), axis=1)
    rows = rotations[np.arange(faces.shape[0]), best]
    return rows[np.lexsort(rows.T[::-1])]


def assert_same_mesh(expected: tuple[np.ndarray, np.ndarray], actual: tuple[np.ndarray, np.ndarray]) -> None:
    (v0, f0), (v1, f1) = expected, actual
    assert v0.shape == v1.shape and f0.shape == f1.shape
    np.testing.assert_allclose(v0[np.lexsort(v0.T[::-1])], v1[np.lexsort(v1.T[::-1])], rtol=0, atol=1e-5)
    np.testing.assert_allclose(face_triples(v0, f0), face_triples(v1, f1), rtol=0, atol=1e-5)
    # Every vertex used; one per crossed grid edge, as in PyMCubes (the equal vertex counts above).
    # Vertices of different edges may coincide: at a corner exactly at the level.
    assert np.array_equal(np.unique(f1), np.arange(v1.shape[0]))


def assert_like_pymcubes(
    volume: np.ndarray, iso: float, *, slab: int = 64, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    expected = reference(volume, iso)
    actual = torch_mc(volume, iso, slab=slab, device=device)
    assert_same_mesh(expected, actual)
    # Stronger than the set comparison: faces in PyMCubes' order with bit-identical corners.
    np.testing.assert_array_equal(expected[0][expected[1]], actual[0][actual[1]])
    return actual


def sphere_sdf(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    axes = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    return (np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))) - radius).astype(np.float32)


def smooth_noise(shape: tuple[int, int, int], sigma: float, seed: int) -> np.ndarray:
    """Gaussian-filtered white noise (periodic, via the FFT), normalised to unit deviation."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * sum(f**2 for f in freqs))
    smooth = np.fft.ifftn(np.fft.fftn(noise) * kernel).real
    return (smooth / smooth.std()).astype(np.float32)


# --- the case table ----------------------------------------------------------------------------


def test_case_table_shape_and_trivial_cases() -> None:
    triangles, counts = build_case_table()
    assert triangles.shape == (256, 15) and counts.shape == (256,)
    assert counts[0] == counts[255] == 0 and counts.max() == 5
    assert (counts[1:255] >= 1).all()
    for case in range(256):
        row = triangles[case]
        assert (row[: 3 * counts[case]] >= 0).all() and (row[: 3 * counts[case]] < 12).all()
        assert (row[3 * counts[case] :] == -1).all()
    # Complementary cases cut the same edges.
    for case in range(256):
        assert set(triangles[case][triangles[case] >= 0]) == set(triangles[255 - case][triangles[255 - case] >= 0])
    assert build_case_table() is build_case_table()


def test_case_table_edges_are_crossed() -> None:
    """A case uses exactly the edges between a corner at or below the level and one above it."""
    triangles, _ = build_case_table()
    corner_of = {offset: m for m, offset in enumerate(CORNERS)}
    for case in range(256):
        crossed = set()
        for e, (axis, start) in enumerate(EDGES):
            end = tuple(s + (n == axis) for n, s in enumerate(start))
            if (case >> corner_of[start] & 1) != (case >> corner_of[end] & 1):
                crossed.add(e)
        assert set(triangles[case][triangles[case] >= 0].tolist()) == crossed


def test_every_case_with_uneven_values() -> None:
    """Each of the 256 cases on one cube with random (not midpoint) crossings."""
    rng = np.random.default_rng(7)
    for case in range(256):
        below = np.array([case >> m & 1 for m in range(8)], dtype=bool).reshape(2, 2, 2)
        volume = np.where(
            below, -rng.uniform(0.01, 1.0, 8).reshape(2, 2, 2), rng.uniform(0.01, 1.0, 8).reshape(2, 2, 2)
        )
        assert_like_pymcubes(volume.astype(np.float32), 0.0)


# --- whole volumes against PyMCubes --------------------------------------------------------------


def test_sphere_sdf() -> None:
    volume = sphere_sdf((40, 40, 40), (0.1, -0.05, 0.2), 0.55)
    vertices, faces = assert_like_pymcubes(volume, 0.0)
    assert faces.shape[0] > 1000
    # Vertices on the surface: index units -> [-1, 1] lies within a voxel of the sphere.
    world = vertices / 39.0 * 2.0 - 1.0
    np.testing.assert_allclose(np.linalg.norm(world - (0.1, -0.05, 0.2), axis=1), 0.55, atol=2.0 / 39.0)


@pytest.mark.parametrize("iso", [0.0, 0.8, -0.3])
def test_random_smooth_volume_with_several_components(iso: float) -> None:
    volume = smooth_noise((26, 33, 19), sigma=2.0, seed=3)
    assert_like_pymcubes(volume, iso)


def test_float64_volume() -> None:
    volume = smooth_noise((17, 12, 21), sigma=1.5, seed=4).astype(np.float64) + 1e-9
    assert_like_pymcubes(volume, 0.25)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("iso", [0.0, 0.05, 0.0500000007])
def test_corners_exactly_at_the_iso_level(dtype: type[np.floating], iso: float) -> None:
    # Quantised to 0.05 steps: many corners equal the level. 0.05 and 0.0500000007 round to the
    # same float32, which is what PyMCubes compares against (its argument is a C float).
    volume = (np.round(smooth_noise((15, 18, 13), sigma=1.5, seed=5) * 4) / 20).astype(dtype)
    assert (volume == np.float32(iso)).sum() > 50 or dtype is np.float64
    assert_like_pymcubes(volume, iso)


def test_equal_corners_count_as_below() -> None:
    volume = np.ones((2, 2, 2), np.float32)
    volume[0, 0, 0] = 0.0
    vertices, faces = assert_like_pymcubes(volume, 0.0)  # a degenerate triangle at the corner
    assert faces.shape == (1, 3)
    np.testing.assert_array_equal(vertices, np.zeros((3, 3)))
    assert torch_mc(np.where(volume == 0.0, 0.0, -1.0).astype(np.float32), 0.0)[1].shape == (0, 3)


@pytest.mark.parametrize("fill", [-1.0, 0.0, 1.0])
def test_empty_and_full_volumes(fill: float) -> None:
    volume = np.full((5, 6, 7), fill, np.float32)
    vertices, faces = assert_like_pymcubes(volume, 0.0)
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)


def test_slab_size_does_not_change_the_result() -> None:
    volume = smooth_noise((21, 16, 18), sigma=1.5, seed=6)
    v64, f64 = torch_mc(volume, 0.3, slab=64)
    for slab in (1, 3, 20):
        v, f = torch_mc(volume, 0.3, slab=slab)
        np.testing.assert_array_equal(v, v64)
        np.testing.assert_array_equal(f, f64)


def test_float32_vertices_by_default_and_bad_arguments() -> None:
    volume = torch.from_numpy(sphere_sdf((9, 9, 9), (0.0, 0.0, 0.0), 0.5))
    vertices, faces = marching_cubes_torch(volume, 0.0)
    assert vertices.dtype == torch.float32 and faces.dtype == torch.int64
    with pytest.raises(ValueError, match="3-D"):
        marching_cubes_torch(volume[0], 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        marching_cubes_torch(volume[:1], 0.0)
    with pytest.raises(ValueError, match="slab"):
        marching_cubes_torch(volume, 0.0, slab=0)
    with pytest.raises(ValueError, match="real"):
        marching_cubes_torch(volume > 0, 0.0)
    with pytest.raises(ValueError, match="floating"):
        marching_cubes_torch(volume, 0.0, dtype=torch.int64)


# --- wiring in kiln_mesh.extract -----------------------------------------------------------------


def test_extract_uses_pymcubes_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = mcubes.marching_cubes

    def spy(volume: np.ndarray, iso: float) -> tuple[np.ndarray, np.ndarray]:
        calls.append(volume.shape)
        return real(volume, iso)

    def no_torch(*args: object, **kwargs: object) -> None:
        raise AssertionError("the torch path ran on the CPU")

    monkeypatch.setattr(mcubes, "marching_cubes", spy)
    monkeypatch.setattr(extract, "marching_cubes_torch", no_torch)
    volume = 25.0 + sphere_sdf((12, 12, 12), (0.0, 0.0, 0.0), 0.5)
    for device in (None, "cpu", torch.device("cpu")):
        marching_cubes(volume, threshold=25.0, radius=0.87, device=device)
    assert calls == [(12, 12, 12)] * 3


def test_extract_torch_path_gives_the_same_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dense at the centre, falling off outwards (TripoSR's density sense), with a boundary hit.
    volume = (25.0 - 40.0 * sphere_sdf((30, 27, 33), (0.3, -0.1, 0.0), 0.75)).astype(np.float32)
    volume[0, :3, :3] = np.inf  # clipped to the largest float32 first, on both paths
    expected = marching_cubes(volume, threshold=25.0, radius=0.87)

    def no_pymcubes(*args: object) -> None:
        raise AssertionError("PyMCubes ran on the torch path")

    monkeypatch.setattr(mcubes, "marching_cubes", no_pymcubes)
    monkeypatch.setattr(extract, "_TORCH_MC_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    actual = marching_cubes(volume, threshold=25.0, radius=0.87, device="cpu")
    assert actual[0].dtype == np.float32 and actual[1].dtype == np.int64
    assert_same_mesh(expected, actual)
    # World coordinates bit for bit, faces in the same order.
    np.testing.assert_array_equal(expected[0][expected[1]], actual[0][actual[1]])
    merged_expected, merged_actual = merge_vertices(*expected), merge_vertices(*actual)
    assert_same_mesh(merged_expected, merged_actual)


# --- CUDA ----------------------------------------------------------------------------------------


@cuda
def test_cuda_matches_pymcubes() -> None:
    cases = [
        (sphere_sdf((40, 40, 40), (0.1, -0.05, 0.2), 0.55), 0.0),
        (smooth_noise((26, 33, 19), sigma=2.0, seed=3), 0.8),
        ((np.round(smooth_noise((15, 18, 13), sigma=1.5, seed=5) * 4) / 20).astype(np.float32), 0.05),
        (np.full((5, 6, 7), 1.0, np.float32), 0.0),
    ]
    for volume, iso in cases:
        assert_like_pymcubes(volume, iso, device="cuda")
        assert_like_pymcubes(volume, iso, device="cuda", slab=3)


@cuda
def test_cuda_extract_path() -> None:
    volume = (25.0 - 40.0 * sphere_sdf((30, 27, 33), (0.3, -0.1, 0.0), 0.75)).astype(np.float32)
    expected = marching_cubes(volume, threshold=25.0, radius=0.87)
    actual = marching_cubes(volume, threshold=25.0, radius=0.87, device="cuda")
    assert_same_mesh(expected, actual)
    np.testing.assert_array_equal(expected[0][expected[1]], actual[0][actual[1]])

"""The device-resident mesh path, run with device="cpu": same arithmetic as on CUDA, checked here.

On CUDA the provider keeps the volume, marching cubes, merging and colours on the GPU
(`extract_mesh_resident`) and encodes under autocast. Everything but the CUDA kernels is the same
code with device="cpu", so it is compared here with the host path it replaces; the tests marked
`cuda` repeat the comparisons on a GPU where there is one.

Half-precision tolerances (tiny checkpoint, resolution 48, against float32; measured values in
brackets, the bounds leave room for other CPUs and for CUDA kernels):

| autocast | scene code / range | grid points across 25.0 | faces   | vertex distance p95 / max (cells) | colour p95 |
| float16  | 1e-3 [4.1e-4]      | 0.3% [0.08%]            | +-2%    | 0.25 [0.10] / 1 [0.50]            | 6 [2]      |
| bfloat16 | 6e-3 [2.2e-3]      | 1.2% [0.36%]            | +-4%    | 1 [0.46] / 2.5 [1.12]             | 32 [12]    |
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.spatial import cKDTree  # type: ignore[import-untyped]

from kiln_mesh.background import CUDA_PROVIDER, PROVIDERS, BackgroundRemover, choose_providers
from kiln_mesh.config import TripoSRSettings
from kiln_mesh.extract import (
    EmptySurface,
    extract_mesh,
    extract_mesh_resident,
    marching_cubes,
    merge_vertices,
    merge_vertices_torch,
    resident_density_grid,
    resident_marching_cubes,
    resident_vertex_colors,
    slab_grid,
    vertex_colors,
)
from kiln_mesh.mc_torch import marching_cubes_torch
from kiln_mesh.mesh import Mesh
from kiln_mesh.providers.triposr_local import (
    TriplaneSlabs,
    TripoSRMeshProvider,
    autocast_dtype,
    uses_resident_path,
)
from kiln_mesh.testing.assets import TinyMeshModels
from kiln_mesh.triposr import TripoSR, load_triposr
from kiln_runtime.device import DeviceChoice, DeviceName
from kiln_runtime.model_source import ModelUnavailable
from kiln_runtime.settings import ModelSettings

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RESOLUTION = 48
THRESHOLD = 25.0


def disc_image() -> Image.Image:
    image = Image.new("RGB", (96, 96), (127, 127, 127))
    ImageDraw.Draw(image).ellipse((20, 16, 76, 84), fill=(230, 120, 40))
    return image


@pytest.fixture(scope="module")
def model(tiny_mesh: TinyMeshModels) -> TripoSR:
    return load_triposr(tiny_mesh.triposr_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def scene_code(model: TripoSR) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode(model.preprocess([disc_image()]))[0]


def sphere_volume(shape: tuple[int, int, int]) -> np.ndarray:
    axes = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    distance = np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, (0.3, -0.1, 0.0), strict=True)))
    return (25.0 - 40.0 * (distance - 0.75)).astype(np.float32)


# --- the pieces, each against the host function it replaces ----------------------------------------


def test_triplane_slabs_equal_grid_density(model: TripoSR, scene_code: torch.Tensor) -> None:
    with torch.inference_mode():
        expected = slab_grid(
            lambda start, stop: model.grid_density(scene_code, RESOLUTION, start, stop), resolution=RESOLUTION, rows=1
        )
        slabs = TriplaneSlabs(model, scene_code, RESOLUTION)
        # Uneven slabs (48 = 20 + 20 + 8): the plane terms are shared, not recomputed per slab.
        volume = resident_density_grid(slabs, resolution=RESOLUTION, rows=20, device="cpu")
    assert volume.dtype == torch.float32 and volume.device.type == "cpu"
    # Only the matrix products' sizes differ: float rounding.
    np.testing.assert_allclose(volume.numpy(), expected, rtol=3e-5, atol=1e-6)


def test_resident_grid_progress_cancel_and_bad_slabs() -> None:
    calls: list[tuple[int, int]] = []
    reports: list[tuple[int, int]] = []

    def slab(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return torch.full((stop - start, 5, 5), float(start), dtype=torch.float16)

    class Stop(Exception):
        pass

    def cancel_after_two(done: int, total: int) -> None:
        reports.append((done, total))
        if done == 2:
            raise Stop  # as Cancelled from a progress report: it propagates, no further slab runs

    with pytest.raises(Stop):
        resident_density_grid(slab, resolution=5, rows=2, device="cpu", on_chunk=cancel_after_two)
    assert calls == [(0, 2), (2, 4)] and reports == [(1, 3), (2, 3)]
    volume = resident_density_grid(slab, resolution=5, rows=2, device="cpu")
    assert volume.dtype == torch.float32 and volume[4, 0, 0] == 4.0
    with pytest.raises(ValueError, match="rows must be"):
        resident_density_grid(slab, resolution=5, rows=0, device="cpu")
    with pytest.raises(ValueError, match="slab density returned"):
        resident_density_grid(lambda a, b: torch.zeros(1, 5, 5), resolution=5, rows=2, device="cpu")


def test_resident_marching_cubes_equals_the_host_path() -> None:
    volume = sphere_volume((30, 27, 33))
    volume[0, :3, :3] = np.inf  # clipped to the largest float32 first, on both paths
    expected_vertices, expected_faces = marching_cubes(volume, threshold=THRESHOLD, radius=0.87)
    vertices, faces = resident_marching_cubes(torch.from_numpy(volume), threshold=THRESHOLD, radius=0.87)
    assert vertices.dtype == torch.float32 and faces.dtype == torch.int64
    # The same world triangles bit for bit, in the same order (vertex numbering differs).
    np.testing.assert_array_equal(expected_vertices[expected_faces], vertices.numpy()[faces.numpy()])
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        resident_marching_cubes(torch.from_numpy(nan), threshold=THRESHOLD, radius=0.87)
    empty_vertices, empty_faces = resident_marching_cubes(torch.zeros(4, 4, 4), threshold=THRESHOLD, radius=0.87)
    assert empty_vertices.shape == (0, 3) and empty_faces.shape == (0, 3)


def test_merge_vertices_torch_equals_merge_vertices() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(size=(40, 3)).astype(np.float64)
    # Exact duplicates, duplicates within 1e-9 (same 8-decimal key), one just outside, unused rows.
    vertices = np.concatenate([base, base[:10], base[10:20] + 1e-10, base[20:21] + 2e-8, rng.normal(size=(5, 3))])
    faces = rng.integers(0, 61, size=(90, 3))
    expected = merge_vertices(vertices, faces)
    actual = merge_vertices_torch(torch.from_numpy(vertices), torch.from_numpy(faces))
    np.testing.assert_array_equal(expected[0], actual[0].numpy())
    np.testing.assert_array_equal(expected[1], actual[1].numpy())
    assert actual[0].shape[0] < 61  # something was merged
    # And on marching cubes output, as the resident path uses it.
    raw_vertices, raw_faces = marching_cubes_torch(torch.from_numpy(sphere_volume((20, 22, 21))), 25.0)
    expected = merge_vertices(raw_vertices.numpy(), raw_faces.numpy())
    actual = merge_vertices_torch(raw_vertices, raw_faces)
    np.testing.assert_array_equal(expected[0], actual[0].numpy())
    np.testing.assert_array_equal(expected[1], actual[1].numpy())
    none = merge_vertices_torch(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))
    assert none[0].shape == (0, 3) and none[1].shape == (0, 3)


def test_resident_vertex_colors_equal_vertex_colors() -> None:
    vertices = np.random.default_rng(3).normal(size=(1000, 3)).astype(np.float32)

    def color(points: torch.Tensor) -> torch.Tensor:
        # Out-of-range, NaN and exact rounding ties (k + 0.5) / 255, as a model might return.
        rgb = torch.stack((points[:, 0], points[:, 1] * 2.0, (torch.round(points[:, 2] * 255.0) + 0.5) / 255.0), 1)
        return torch.where(points[:, :1] > 1.5, float("nan"), rgb)  # NaN where the point says, not the chunk

    expected = vertex_colors(color, vertices, chunk_size=128)
    chunks: list[tuple[int, int]] = []
    actual = resident_vertex_colors(
        color, torch.from_numpy(vertices), chunk_size=300, on_chunk=lambda d, t: chunks.append((d, t))
    )
    assert actual.dtype == torch.uint8
    np.testing.assert_array_equal(expected, actual.numpy())
    assert chunks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(ValueError, match="color returned shape"):
        resident_vertex_colors(lambda p: p[:, :2], torch.from_numpy(vertices), chunk_size=300)


# --- the whole path ------------------------------------------------------------------------------


def same_mesh(host: Mesh, resident: Mesh) -> None:
    """Same triangles in world units bit for bit and in order; same colours per position."""
    np.testing.assert_array_equal(host.vertices[host.faces], resident.vertices[resident.faces])
    np.testing.assert_array_equal(host.vertex_colors[host.faces], resident.vertex_colors[resident.faces])


def test_extract_mesh_resident_equals_extract_mesh(model: TripoSR, scene_code: torch.Tensor) -> None:
    def color(points: torch.Tensor) -> torch.Tensor:
        return model.query(scene_code, points)[1]

    def slabs(start: int, stop: int) -> torch.Tensor:
        return model.grid_density(scene_code, RESOLUTION, start, stop)

    reports: list[tuple[int, int]] = []
    with torch.inference_mode():
        host = extract_mesh(
            lambda p: model.query_density(scene_code, p),
            color,
            resolution=RESOLUTION,
            threshold=THRESHOLD,
            radius=model.radius,
            chunk_size=1 << 16,
            slab_density=slabs,
        )
        # The same slab function, so the same volume: the rest must give the same mesh. One colour
        # call for all vertices, as on a GPU (the MLP's rounding is per row, not per batch size).
        resident = extract_mesh_resident(
            slabs,
            color,
            resolution=RESOLUTION,
            threshold=THRESHOLD,
            radius=model.radius,
            slab_points=20 * RESOLUTION**2,
            device="cpu",
            on_chunk=lambda done, total: reports.append((done, total)),
        )
    assert resident.face_count > 1000
    same_mesh(host, resident)
    # Progress: slabs 1..3 of total 4, the later stages at 3, then 4/4.
    assert reports[:3] == [(1, 4), (2, 4), (3, 4)] and reports[-1] == (4, 4)
    assert {done for done, _ in reports[3:-1]} == {3}
    with torch.inference_mode(), pytest.raises(EmptySurface, match=r"no surface at threshold 1000000000\.0"):
        extract_mesh_resident(
            slabs, None, resolution=RESOLUTION, threshold=1e9, radius=model.radius, slab_points=1, device="cpu"
        )
    with torch.inference_mode():
        grey = extract_mesh_resident(
            TriplaneSlabs(model, scene_code, 24),
            None,
            resolution=24,
            threshold=THRESHOLD,
            radius=model.radius,
            slab_points=1 << 20,
            device="cpu",
        )
    assert (grey.vertex_colors == 128).all()


# --- the provider: settings, autocast, warm-up, rembg providers ------------------------------------


def test_setting_resolution() -> None:
    assert autocast_dtype("auto", "cuda") is torch.float16 and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("auto", "mps") is None and autocast_dtype("off", "cuda") is None
    assert autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    assert uses_resident_path("auto", "cuda") and not uses_resident_path("auto", "cpu")
    assert uses_resident_path("on", "cpu") and not uses_resident_path("off", "cuda")


def test_rembg_provider_choice() -> None:
    cpu_only, with_cuda = ["CPUExecutionProvider"], [CUDA_PROVIDER, "CPUExecutionProvider"]
    assert choose_providers("auto", "cuda", with_cuda) == [CUDA_PROVIDER, *PROVIDERS]
    assert choose_providers("auto", "cuda", cpu_only) == PROVIDERS  # plain onnxruntime: CPU
    assert choose_providers("auto", "cpu", with_cuda) == PROVIDERS  # a CPU model: no GPU to share
    assert choose_providers("cpu", "cuda", with_cuda) == PROVIDERS
    assert choose_providers("cuda", "cpu", with_cuda) == [CUDA_PROVIDER, *PROVIDERS]
    with pytest.raises(ModelUnavailable, match="onnxruntime-gpu"):
        choose_providers("cuda", "cuda", cpu_only)


def test_remover_loads_with_the_chosen_providers(tiny_mesh: TinyMeshModels) -> None:
    import onnxruntime  # type: ignore[import-untyped]

    has_cuda = CUDA_PROVIDER in onnxruntime.get_available_providers()
    remover = BackgroundRemover(model_path=tiny_mesh.u2net_path, device="auto", model_device="cuda")
    remover.load()
    assert remover.providers == ([CUDA_PROVIDER, *PROVIDERS] if has_cuda else PROVIDERS)
    assert remover(disc_image()).mode == "RGBA"
    if not has_cuda:
        with pytest.raises(ModelUnavailable, match="REMBG_DEVICE=cuda"):
            BackgroundRemover(model_path=tiny_mesh.u2net_path, device="cuda", model_device="cuda").load()


@contextmanager
def provider(tiny: TinyMeshModels, device: DeviceName = "cpu", **settings: Any) -> Iterator[TripoSRMeshProvider]:
    mesh_provider = TripoSRMeshProvider(
        ModelSettings(id=str(tiny.triposr_dir)),
        TripoSRSettings(rembg_model_path=Path(tiny.u2net_path), **settings),
        DeviceChoice(device, "float32"),
        offline=True,
    )
    mesh_provider.load()
    try:
        yield mesh_provider
    finally:
        mesh_provider.close()


def provider_mesh(mesh_provider: TripoSRMeshProvider, resolution: int = RESOLUTION) -> Mesh:
    model = mesh_provider._require_model()
    scene = mesh_provider._encode(model, disc_image())
    return mesh_provider._extract(model, scene, resolution=resolution, threshold=THRESHOLD, colored=True, on_chunk=None)


def test_warmup_runs_the_whole_mesh_path(tiny_mesh: TinyMeshModels, caplog: pytest.LogCaptureFixture) -> None:
    for resident in ("off", "on"):
        with provider(tiny_mesh, resident_path=resident, warmup_resolution=20) as mesh_provider:
            assert mesh_provider.resident is (resident == "on") and mesh_provider.autocast is None
            with caplog.at_level(logging.INFO, logger="kiln_mesh.providers.triposr_local"):
                caplog.clear()
                mesh_provider.warmup()
            messages = [record.getMessage() for record in caplog.records]
            assert any(m.startswith("warm-up mesh at resolution 20 in") for m in messages), messages
            assert not any("no surface" in m for m in messages), messages


def test_provider_resident_path_matches_the_host_path(tiny_mesh: TinyMeshModels) -> None:
    with provider(tiny_mesh, resident_path="off") as host_provider:
        host = provider_mesh(host_provider)
    with provider(tiny_mesh, resident_path="on") as resident_provider:
        resident = provider_mesh(resident_provider)
    # Different grid code (plane terms once vs per slab): equal to float rounding, so compare
    # positions with a tolerance far below a grid cell and colours to one level.
    assert_close_meshes(host, resident, faces=0.001, p95_cells=1e-4, max_cells=1e-3, colour_p95=1)


def assert_close_meshes(
    reference: Mesh, other: Mesh, *, faces: float, p95_cells: float, max_cells: float, colour_p95: float
) -> None:
    cell = 2 * 0.87 / (RESOLUTION - 1)
    assert abs(other.face_count / reference.face_count - 1.0) <= faces, (other.face_count, reference.face_count)
    tree = cKDTree(reference.vertices)
    forward, nearest = tree.query(other.vertices)
    backward, _ = cKDTree(other.vertices).query(reference.vertices)
    distances = np.concatenate([forward, backward]) / cell
    assert np.percentile(distances, 95) <= p95_cells and distances.max() <= max_cells, (
        np.percentile(distances, 95),
        distances.max(),
    )
    colours = np.abs(other.vertex_colors.astype(int) - reference.vertex_colors[nearest].astype(int))
    assert np.percentile(colours, 95) <= colour_p95, np.percentile(colours, 95)


@pytest.mark.parametrize(
    ("dtype", "code_tol", "flip_tol", "faces", "p95_cells", "max_cells", "colour_p95"),
    [("float16", 1e-3, 0.003, 0.02, 0.25, 1.0, 6), ("bfloat16", 6e-3, 0.012, 0.04, 1.0, 2.5, 32)],
)
def test_autocast_parity(
    tiny_mesh: TinyMeshModels,
    dtype: str,
    code_tol: float,
    flip_tol: float,
    faces: float,
    p95_cells: float,
    max_cells: float,
    colour_p95: float,
) -> None:
    # CPU autocast runs the same code as CUDA's; tolerances in the module docstring.
    with provider(tiny_mesh, resident_path="on", autocast="off") as reference:
        model = reference._require_model()
        code = reference._encode(model, disc_image())
        with torch.inference_mode():
            volume = TriplaneSlabs(model, code, RESOLUTION)(0, RESOLUTION)
        expected = provider_mesh(reference)
    with provider(tiny_mesh, resident_path="on", autocast=dtype) as half:
        assert half.autocast is getattr(torch, dtype) and half.dtype is torch.float32
        half_model = half._require_model()
        half_code = half._encode(half_model, disc_image())
        assert half_code.dtype == torch.float32
        with torch.inference_mode(), torch.autocast("cpu", dtype=getattr(torch, dtype)):
            half_volume = TriplaneSlabs(half_model, half_code, RESOLUTION)(0, RESOLUTION)
        actual = provider_mesh(half)
    assert float((half_code - code).abs().max() / (code.max() - code.min())) <= code_tol
    assert 0 < float(((half_volume > THRESHOLD) != (volume > THRESHOLD)).float().mean()) <= flip_tol
    assert_close_meshes(expected, actual, faces=faces, p95_cells=p95_cells, max_cells=max_cells, colour_p95=colour_p95)


# --- CUDA ----------------------------------------------------------------------------------------


@cuda
def test_cuda_resident_path_matches_the_cpu_host_path(tiny_mesh: TinyMeshModels) -> None:
    with provider(tiny_mesh, resident_path="off") as host_provider:
        host = provider_mesh(host_provider)
    with provider(tiny_mesh, "cuda", autocast="off") as gpu:
        assert gpu.resident
        resident = provider_mesh(gpu)
    # GPU kernels round differently from the CPU's: compare like the grid-code difference above.
    assert_close_meshes(host, resident, faces=0.002, p95_cells=1e-3, max_cells=0.05, colour_p95=1)


@cuda
def test_cuda_autocast_float16_parity(tiny_mesh: TinyMeshModels) -> None:
    with provider(tiny_mesh, resident_path="off") as host_provider:
        host = provider_mesh(host_provider)
    with provider(tiny_mesh, "cuda") as gpu:  # the CUDA defaults: resident, float16 autocast
        assert gpu.resident and gpu.autocast is torch.float16
        gpu.warmup()
        resident = provider_mesh(gpu)
    assert_close_meshes(host, resident, faces=0.02, p95_cells=0.25, max_cells=1.0, colour_p95=6)

"""Per-stage time and peak memory of Kiln's TripoSR path on the CPU, against the original's method.

Stages: background removal (rembg, tiny u2net), encode (image -> scene codes), density query on
the marching-cubes grid at resolutions 128 and 256, marching cubes + merge + colours, export (GLB).
The baseline, run in the same process on the same weights, is the reference code's way of
querying the grid: chunks of 8192 points, each sampled from the three planes and run through
the whole decoder. Kiln fills the grid by x-slabs of ~65536 points and uses the triplane's
structure (each plane sampled once per 2-D grid position, projected through its third of the
decoder's first layer, summed by broadcasting). Both give the same volume (checked to 1e-5).

    python benchmarks/mesh_stages.py            # tiny checkpoint (seconds)
    python benchmarks/mesh_stages.py --full     # plus the published dimensions, random weights (minutes)

Reference timings of the original code on random weights (2 CPU cores), for context:
image -> scene codes 27-47 s; the 256^3 density query 36 s (chunk 8192).
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import yaml  # type: ignore[import-untyped]
from PIL import Image, ImageDraw

from kiln_mesh.background import BackgroundRemover
from kiln_mesh.export import MeshFormat, export_mesh
from kiln_mesh.extract import SlabDensityFn, density_grid, extract_mesh, slab_grid
from kiln_mesh.mesh import to_y_up
from kiln_mesh.preprocess import prepare_mesh_input
from kiln_mesh.testing.assets import ensure_tiny_mesh_models
from kiln_mesh.triposr import TripoSR, load_triposr
from kiln_mesh.triposr.config import PUBLISHED_CONFIG_YAML, parse_triposr_config


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured(name: str, rows: list[tuple[str, float, float]]) -> Iterator[None]:
    """Time a stage and sample the process's peak resident memory while it runs."""
    peak = [rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        rows.append((name, seconds, max(peak[0], rss_bytes()) / 2**30))


def reference_density(model: TripoSR, code: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The original's grid query: the whole decoder (density and colour) for every point."""
    return lambda points: model.query(code, points)[0]


def slabs_of(model: TripoSR, code: torch.Tensor, resolution: int) -> SlabDensityFn:
    """Kiln's grid fill: slabs of x rows through the factored triplane query."""
    return lambda start, stop: model.grid_density(code, resolution, start, stop)


def randomize(model: TripoSR) -> TripoSR:
    """Random weights with sane scales (construction leaves parameters uninitialised)."""
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(parameter)
        elif parameter.ndim == 1:  # norm scales
            torch.nn.init.ones_(parameter)
        elif name.startswith("decoder."):
            # Wide enough that the density varies over the grid (std 0.02 would make it constant).
            torch.nn.init.normal_(parameter, std=2.0 / parameter.shape[1] ** 0.5, generator=generator)
        else:
            torch.nn.init.normal_(parameter, std=0.02, generator=generator)
    return model.eval()


def subject() -> Image.Image:
    image = Image.new("RGB", (256, 256), (12, 12, 12))
    ImageDraw.Draw(image).ellipse((60, 40, 196, 220), fill=(220, 130, 60))
    return image


def run(
    model: TripoSR,
    label: str,
    remover: Any,
    *,
    resolutions: tuple[int, ...],
    mesh_at: int,
    threshold: float | None = 25.0,
) -> None:
    rows: list[tuple[str, float, float]] = []
    with measured("remove background (u2net tiny)", rows):
        image, _ = prepare_mesh_input(subject(), mode="AUTO", ratio=0.85, remove=remover)
    with measured("encode (image -> scene codes)", rows), torch.inference_mode():
        code = model.encode(model.preprocess([image]))[0]
    ratios = []
    for resolution in resolutions:
        with measured(f"density {resolution}^3, original method (chunk 8192, full decoder)", rows):
            baseline = density_grid(
                reference_density(model, code), resolution=resolution, radius=model.radius, chunk_size=8192
            )
        with measured(f"density {resolution}^3, Kiln (slabs of ~65536 points, factored planes)", rows):
            ours = slab_grid(
                slabs_of(model, code, resolution),
                resolution=resolution,
                rows=max(1, 65536 // resolution**2),
            )
        np.testing.assert_allclose(ours, baseline, rtol=1e-5, atol=1e-5 * float(np.abs(baseline).max()))
        ratios.append((resolution, rows[-2][1] / rows[-1][1]))
    if threshold is None:
        # Random weights put the density nowhere near 25: mesh at the volume's median instead, so
        # the stage has a surface to extract (its timing is not representative of real objects).
        threshold = float(np.median(ours))
    with measured(f"extract {mesh_at}^3 (density, marching cubes, merge, colours)", rows):
        mesh = extract_mesh(
            lambda p: model.query_density(code, p),
            lambda p: model.query(code, p)[1],
            resolution=mesh_at,
            threshold=threshold,
            radius=model.radius,
            chunk_size=65536,
            slab_density=slabs_of(model, code, mesh_at),
        )
    with measured("export GLB (Y-up)", rows):
        data = export_mesh(to_y_up(mesh), MeshFormat.GLB)
    print(f"\n{label}: {mesh.vertex_count} vertices, {mesh.face_count} faces, GLB {len(data) / 2**20:.1f} MiB")
    for name, seconds, peak in rows:
        print(f"  {name:66} {seconds:8.2f} s   peak RSS {peak:5.2f} GiB")
    for resolution, ratio in ratios:
        print(f"  density query {resolution}^3: Kiln is {ratio:.2f}x faster than the original method (same volume)")


def main(full: bool) -> None:
    torch.set_num_threads(2)
    tiny = ensure_tiny_mesh_models()
    remover = BackgroundRemover(model_path=tiny.u2net_path, offline=True)
    remover.load()
    run(load_triposr(tiny.triposr_dir), "tiny checkpoint", remover, resolutions=(128, 256), mesh_at=256)
    if full:
        torch.manual_seed(0)
        config = parse_triposr_config(yaml.safe_load(io.StringIO(PUBLISHED_CONFIG_YAML)))
        model = randomize(TripoSR(config))
        # Random weights make the density field noise; marching cubes on it yields millions of faces,
        # so the full model is meshed at 128 only, at the volume's median density.
        run(model, "published dimensions, random weights", remover, resolutions=(128, 256), mesh_at=128, threshold=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also run the published dimensions (minutes)")
    main(parser.parse_args().full)

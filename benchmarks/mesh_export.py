"""Mesh export time: Kiln's own GLB/OBJ/PLY writers against trimesh's, on the same mesh.

The mesh is a UV sphere of about 2 M faces (1 M vertices) in the Y-up frame the service sends,
with seeded random per-vertex colours; the textured case bakes nothing and instead gives the same
sphere spherical UVs and a 2048^2 RGBA texture, so the geometry and PNG size are those of a real
baked result. trimesh is the baseline, run in the same process on the same arrays:
``trimesh.Trimesh(vertices, faces, vertex_colors=..., process=False).export(file_type=...)``
(``process=False`` keeps vertex order and count, as Kiln does). Before timing, each pair of files
is read back with trimesh and compared (vertices, faces, colours or UVs), so the two sides write
the same content.

Each case is run ``--repeat`` times alternately (Kiln, trimesh, Kiln, ...) so machine noise hits
both alike; the table shows the median seconds, file sizes and the ratio Kiln / trimesh (below 1:
Kiln is faster). Kiln keeps a writer of its own only where it is more than 1.5x faster; the
textured GLB did not pass (1.04x with the former hand-written writer, 2 M faces, 2 cores: the PNG
encoding dominates and is Pillow's either way), so Kiln's textured row is now trimesh plus the
sampler Kiln adds, and shows what that addition costs.

    python benchmarks/mesh_export.py            # ~2 M faces (about a minute on 2 cores)
    python benchmarks/mesh_export.py --quick    # ~200 k faces (seconds)
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import trimesh
from PIL import Image

from kiln_mesh.export import MeshFormat, export_glb_textured, export_mesh
from kiln_mesh.mesh import Mesh, TexturedMesh, to_y_up, uv_sphere

KEEP_ABOVE = 1.5


def colourful_sphere(segments: int, rings: int) -> Mesh:
    """A Y-up sphere with seeded noise colours, so a shuffled row or channel would show."""
    sphere = to_y_up(uv_sphere(1.0, segments, rings))
    colors = np.random.default_rng(0).integers(0, 256, size=(sphere.vertex_count, 3), dtype=np.uint8)
    return Mesh(vertices=sphere.vertices, faces=sphere.faces, vertex_colors=colors)


def textured_sphere(mesh: Mesh, resolution: int) -> TexturedMesh:
    """The same geometry with spherical UVs (glTF's top-left origin) and a noise texture."""
    p = mesh.vertices.astype(np.float64)
    u = (np.arctan2(p[:, 2], p[:, 0]) / (2 * np.pi)) % 1.0
    v = np.arccos(np.clip(p[:, 1], -1.0, 1.0)) / np.pi
    uvs = np.column_stack([u, v]).astype(np.float32)
    # A smooth gradient plus a little noise: compresses like a baked atlas, not like white noise.
    ramp = np.linspace(0, 255, resolution, dtype=np.float64)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0 + 0 * ramp[None, :]), axis=-1)
    rgb += np.random.default_rng(1).normal(scale=4.0, size=rgb.shape)
    rgba = np.dstack([rgb.clip(0, 255).astype(np.uint8), np.full((resolution, resolution), 255, np.uint8)])
    return TexturedMesh(vertices=mesh.vertices, faces=mesh.faces, uvs=uvs, texture=Image.fromarray(rgba, "RGBA"))


def as_bytes(data: object) -> bytes:
    """trimesh returns text formats (OBJ) as str; the service stores bytes."""
    if isinstance(data, str):
        return data.encode("ascii")
    if isinstance(data, bytes):
        return data
    raise TypeError(f"trimesh returned {type(data).__name__}, not a file")


def trimesh_of(mesh: Mesh) -> trimesh.Trimesh:
    return trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=mesh.vertex_colors, process=False)


def trimesh_textured(mesh: TexturedMesh) -> trimesh.Trimesh:
    material = trimesh.visual.material.PBRMaterial(  # type: ignore[no-untyped-call]
        baseColorTexture=mesh.texture, metallicFactor=0.0, roughnessFactor=1.0
    )
    # trimesh keeps UVs with a bottom-left origin and flips v when it writes glTF.
    uv = np.column_stack([mesh.uvs[:, 0], 1.0 - mesh.uvs[:, 1]])
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)  # type: ignore[no-untyped-call]
    return trimesh.Trimesh(mesh.vertices, mesh.faces, visual=visual, process=False)


def load(data: bytes, file_type: str) -> trimesh.Trimesh:
    loaded: Any = trimesh.load(io.BytesIO(data), file_type=file_type, process=False, force="mesh")
    assert isinstance(loaded, trimesh.Trimesh)
    return loaded


def assert_same_content(ours: bytes, theirs: bytes, file_type: str, *, textured: bool = False) -> None:
    a, b = load(ours, file_type), load(theirs, file_type)
    np.testing.assert_allclose(a.vertices, b.vertices, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.faces, b.faces)
    if textured:
        ta: Any = a.visual
        tb: Any = b.visual
        np.testing.assert_allclose(ta.uv, tb.uv, atol=1e-6)
        texture_a, texture_b = ta.material.baseColorTexture, tb.material.baseColorTexture
        np.testing.assert_array_equal(np.asarray(texture_a), np.asarray(texture_b))
        return
    va, vb = a.visual, b.visual
    assert isinstance(va, trimesh.visual.ColorVisuals)
    assert isinstance(vb, trimesh.visual.ColorVisuals)
    assert va.kind == vb.kind == "vertex"
    ca = np.asarray(va.vertex_colors)[:, :3].astype(np.int64)
    cb = np.asarray(vb.vertex_colors)[:, :3].astype(np.int64)
    assert np.abs(ca - cb).max() <= (1 if file_type == "obj" else 0)  # OBJ colours are decimal floats


def timed(fn: Callable[[], bytes]) -> tuple[float, bytes]:
    started = time.perf_counter()
    data = fn()
    return time.perf_counter() - started, data


def compare(
    label: str, ours: Callable[[], bytes], theirs: Callable[[], bytes], file_type: str, repeat: int, **kw: bool
) -> tuple[str, float, float, int, int]:
    ours_s: list[float] = []
    theirs_s: list[float] = []
    for _ in range(repeat):
        seconds, mine = timed(ours)
        ours_s.append(seconds)
        seconds, other = timed(theirs)
        theirs_s.append(seconds)
    assert_same_content(mine, other, file_type, **kw)
    return label, statistics.median(ours_s), statistics.median(theirs_s), len(mine), len(other)


def main(quick: bool, repeat: int) -> None:
    segments, rings, texture = (317, 317, 1024) if quick else (1001, 1000, 2048)
    mesh = colourful_sphere(segments, rings)
    textured = textured_sphere(mesh, texture)
    print(f"mesh: {mesh.vertex_count} vertices, {mesh.face_count} faces; texture {texture}^2; median of {repeat}")

    rows = [
        compare(
            fmt.name,
            lambda fmt=fmt: export_mesh(mesh, fmt),  # type: ignore[misc]
            lambda fmt=fmt: as_bytes(trimesh_of(mesh).export(file_type=fmt.value)),  # type: ignore[misc]
            fmt.value,
            repeat,
        )
        for fmt in MeshFormat
    ]
    rows.append(
        compare(
            "GLB textured",
            lambda: export_glb_textured(textured),
            lambda: as_bytes(trimesh_textured(textured).export(file_type="glb")),
            "glb",
            repeat,
            textured=True,
        )
    )
    print(f"  {'format':14} {'Kiln s':>8} {'trimesh s':>10} {'Kiln MiB':>9} {'trimesh MiB':>12} {'Kiln/trimesh':>13}")
    for name, ours_s, theirs_s, ours_b, theirs_b in rows:
        # The rule: a writer of Kiln's own only where it is more than 1.5x faster.
        verdict = "own writer pays" if theirs_s / ours_s > KEEP_ABOVE else "use trimesh"
        print(
            f"  {name:14} {ours_s:8.3f} {theirs_s:10.3f} {ours_b / 2**20:9.1f} {theirs_b / 2**20:12.1f}"
            f" {ours_s / theirs_s:13.2f}   ({theirs_s / ours_s:.2f}x faster: {verdict})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~200 k-face mesh instead of ~2 M")
    parser.add_argument("--repeat", type=int, default=3, help="runs per writer and format (median shown)")
    args = parser.parse_args()
    main(args.quick, args.repeat)

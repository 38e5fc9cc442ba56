"""Unit tests for kiln_mesh.bake (headless texture baking) and export_glb_textured.

The colour field used throughout encodes position (``(p - centre) / radius + 1) / 2``), so any
texel's colour says where on the sphere it was sampled: a wrong UV flip, a transposed image or a
shifted texel centre shows up as a colour that does not match the vertex it belongs to. GLBs are
read back with trimesh, an independent reader that also applies glTF's UV convention itself.
"""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trimesh
from PIL import Image

from kiln_mesh.bake import AtlasRaster, bake_texture, default_padding, rasterize_positions
from kiln_mesh.export import export_glb_textured
from kiln_mesh.mesh import Mesh, TexturedMesh, uv_sphere

CENTER = np.array([0.25, -0.5, 1.0])
RADIUS = 1.5
RESOLUTION = 256


def position_color(center: npt.ArrayLike, radius: float) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]]:
    c = np.asarray(center, dtype=np.float64)

    def color_at(points: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return np.asarray((points.astype(np.float64) - c) / radius + 1.0) / 2.0

    return color_at


COLOR_AT = position_color(CENTER, RADIUS)


def bilinear(image: npt.NDArray[np.float64], uv: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Sample an (H, W, C) image at glTF UVs: origin top-left, v down, texel centres at half-integers."""
    h, w = image.shape[:2]
    x = np.asarray(uv[:, 0], dtype=np.float64) * w - 0.5
    y = np.asarray(uv[:, 1], dtype=np.float64) * h - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    xa, xb = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)  # clamp-to-edge, as the sampler says
    ya, yb = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    top = image[ya, xa] * (1 - fx) + image[ya, xb] * fx
    bottom = image[yb, xa] * (1 - fx) + image[yb, xb] * fx
    return np.asarray(top * (1 - fy) + bottom * fy, dtype=np.float64)


def texture_rgb(mesh: TexturedMesh) -> npt.NDArray[np.float64]:
    return np.asarray(mesh.texture.convert("RGB"), dtype=np.float64) / 255.0


def raster_of(mesh: TexturedMesh, resolution: int = RESOLUTION) -> AtlasRaster:
    return rasterize_positions(
        mesh.vertices, mesh.faces, mesh.uvs, resolution=resolution, padding=default_padding(resolution)
    )


def load_glb(data: bytes) -> trimesh.Trimesh:
    loaded: Any = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh", process=False)
    assert isinstance(loaded, trimesh.Trimesh)
    return loaded


def parse_glb(data: bytes) -> tuple[dict[str, Any], bytes]:
    magic, version, total = struct.unpack_from("<III", data, 0)
    assert magic == 0x46546C67 and version == 2 and total == len(data)
    json_len, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_len % 4 == 0
    doc = json.loads(data[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<II", data, 20 + json_len)
    assert bin_type == 0x004E4942 and bin_len % 4 == 0
    assert 28 + json_len + bin_len == total
    return doc, data[28 + json_len : 28 + json_len + bin_len]


@pytest.fixture(scope="module")
def sphere() -> Mesh:
    return uv_sphere(RADIUS, 48, 24, center=(0.25, -0.5, 1.0))


@pytest.fixture(scope="module")
def baked(sphere: Mesh) -> TexturedMesh:
    return bake_texture(sphere, COLOR_AT, resolution=RESOLUTION)


@pytest.fixture(scope="module")
def glb(baked: TexturedMesh) -> bytes:
    return export_glb_textured(baked)


# --- baking a sphere ---------------------------------------------------------------------------


def test_bake_keeps_geometry_and_splits_seams(sphere: Mesh, baked: TexturedMesh) -> None:
    assert baked.face_count == sphere.face_count
    assert baked.vertex_count >= sphere.vertex_count  # seams duplicate vertices
    assert baked.texture.size == (RESOLUTION, RESOLUTION) and baked.texture.mode == "RGBA"
    assert baked.uvs.dtype == np.float32 and ((baked.uvs >= 0) & (baked.uvs <= 1)).all()
    # Same triangles, same order and winding: every face's corner positions are unchanged.
    np.testing.assert_array_equal(baked.vertices[baked.faces], sphere.vertices[sphere.faces.astype(np.int64)])


def test_texture_at_vertex_uvs_matches_color_at(baked: TexturedMesh) -> None:
    # The orientation test: sampling at (u, v) with v measured DOWN from the top row must give the
    # vertex's own colour; with the opposite flip it must not (so this test can fail).
    rgb = texture_rgb(baked)
    expected = COLOR_AT(baked.vertices)
    err = np.abs(bilinear(rgb, baked.uvs) - expected)
    assert err.max() < 0.03 and err.mean() < 0.004

    flipped = baked.uvs * np.array([1.0, -1.0]) + np.array([0.0, 1.0])
    assert np.abs(bilinear(rgb, flipped) - expected).mean() > 0.1


def test_texture_at_face_centroids_matches_color_at(baked: TexturedMesh) -> None:
    # UV centroids lie inside the triangles (covered texels, not gutter); UV -> position is affine
    # per triangle, so the centroid's colour is color_at of the 3-D centroid up to one texel.
    faces = baked.faces.astype(np.int64)
    uv_centroids = baked.uvs[faces].mean(axis=1)
    expected = COLOR_AT(baked.vertices[faces].mean(axis=1).astype(np.float32))
    err = np.abs(bilinear(texture_rgb(baked), uv_centroids) - expected)
    assert err.max() < 0.01 and err.mean() < 0.003


def test_coverage_gutter_and_alpha(sphere: Mesh, baked: TexturedMesh) -> None:
    raster = raster_of(baked)
    covered, gutter = raster.covered, raster.gutter
    assert covered.mean() > 0.3
    assert gutter.any() and not (gutter & covered).any()
    assert (covered | gutter).sum() > covered.sum()
    alpha = np.asarray(baked.texture)[..., 3]
    np.testing.assert_array_equal(alpha == 255, covered | gutter)
    assert set(np.unique(alpha).tolist()) == {0, 255}
    # Every written position is on the surface: on a chord of the sphere, so within the sagitta.
    pos = raster.positions[covered | gutter].astype(np.float64)
    dist = np.linalg.norm(pos - CENTER, axis=1)
    assert dist.max() <= RADIUS * (1 + 1e-5) and dist.min() > RADIUS * 0.99


def test_texels_far_from_triangles_are_transparent_black(baked: TexturedMesh) -> None:
    from scipy import ndimage  # type: ignore[import-untyped]

    raster = raster_of(baked)
    far = ndimage.distance_transform_edt(~raster.covered) > default_padding(RESOLUTION) + 0.5
    assert far.sum() > 0.05 * far.size  # the atlas does leave empty space
    pixels = np.asarray(baked.texture)
    assert (pixels[far] == 0).all()


def test_color_at_called_once_with_float32_positions(sphere: Mesh) -> None:
    calls: list[npt.NDArray[np.float32]] = []

    def recording(points: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        calls.append(points)
        return COLOR_AT(points)

    baked = bake_texture(sphere, recording, resolution=64)
    assert len(calls) == 1
    (points,) = calls
    assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 3
    assert len(points) == int((np.asarray(baked.texture)[..., 3] == 255).sum())


def test_bake_is_deterministic(sphere: Mesh, glb: bytes) -> None:
    again = bake_texture(sphere, COLOR_AT, resolution=RESOLUTION)
    assert export_glb_textured(again) == glb


# --- the rasteriser on hand-checkable input -----------------------------------------------------


def quad(
    u0: float, v0: float, u1: float, v1: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Two triangles covering the UV rectangle [u0, u1] x [v0, v1]; position = (2u, 3v, 1 - u)."""
    uvs = np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=np.float32)
    vertices = np.stack([2 * uvs[:, 0], 3 * uvs[:, 1], 1 - uvs[:, 0]], axis=1).astype(np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int64)
    return vertices, faces, uvs


def test_quad_rasterises_exactly() -> None:
    res, pad = 16, 2
    raster = rasterize_positions(*quad(0.25, 0.25, 0.75, 0.75), resolution=res, padding=pad)
    # Texel centres (i + 0.5) / 16 inside [0.25, 0.75]: rows and columns 4..11, nothing else.
    expected = np.zeros((res, res), dtype=bool)
    expected[4:12, 4:12] = True
    np.testing.assert_array_equal(raster.covered, expected)
    # Hand-checked: texel (row 4, col 4) has its centre at uv (4.5/16, 4.5/16) = (0.28125, 0.28125).
    np.testing.assert_allclose(raster.positions[4, 4], [0.5625, 0.84375, 0.71875], atol=1e-6)
    # Texel (row 4, col 11): uv (11.5/16, 4.5/16) = (0.71875, 0.28125). Column = u, row = v.
    np.testing.assert_allclose(raster.positions[4, 11], [1.4375, 0.84375, 0.28125], atol=1e-6)
    # Every covered texel: the affine map evaluated at its centre.
    centres = (np.arange(res) + 0.5) / res
    u, v = np.meshgrid(centres, centres, indexing="xy")
    exact = np.stack([2 * u, 3 * v, 1 - u], axis=-1)
    np.testing.assert_allclose(raster.positions[expected], exact[expected], atol=1e-6)

    # Gutter: uncovered texels within Euclidean distance 2 of the square, by brute force; each
    # holds the position of its nearest covered texel (for a square: the clamped one).
    rows, cols = np.mgrid[0:res, 0:res]
    dr = np.maximum(np.maximum(4 - rows, rows - 11), 0)
    dc = np.maximum(np.maximum(4 - cols, cols - 11), 0)
    expected_gutter = ~expected & (dr**2 + dc**2 <= pad**2)
    np.testing.assert_array_equal(raster.gutter, expected_gutter)
    clamped = exact[np.clip(rows, 4, 11), np.clip(cols, 4, 11)]
    np.testing.assert_allclose(raster.positions[expected_gutter], clamped[expected_gutter], atol=1e-6)
    assert (raster.positions[~expected & ~expected_gutter] == 0).all()


def test_small_v_is_the_top_of_the_image() -> None:
    # A quad over v in [0, 0.5] must fill the top half of the texture: row 0 is v = 0 (glTF).
    vertices, faces, uvs = quad(0.0, 0.0, 1.0, 0.5)
    raster = rasterize_positions(vertices, faces, uvs, resolution=8, padding=0)
    assert raster.covered[:4].all() and not raster.covered[4:].any()


def test_sub_texel_triangle_claims_its_centroid_texel() -> None:
    # Contains no texel centre at all; without the centroid splat it would get no colour.
    uvs = np.array([[0.51, 0.51], [0.54, 0.51], [0.51, 0.54]], dtype=np.float32)
    vertices = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    raster = rasterize_positions(vertices, np.array([[0, 1, 2]]), uvs, resolution=16, padding=0)
    assert raster.covered.sum() == 1 and raster.covered[8, 8]
    np.testing.assert_allclose(raster.positions[8, 8], [1 / 3, 1 / 3, 1 / 3], atol=1e-6)


def test_bake_rejects_bad_input(sphere: Mesh) -> None:
    empty = Mesh(
        vertices=np.zeros((3, 3), np.float32),
        faces=np.zeros((0, 3), np.int64),
        vertex_colors=np.zeros((3, 3), np.uint8),
    )
    with pytest.raises(ValueError, match="no faces"):
        bake_texture(empty, COLOR_AT, resolution=64)
    with pytest.raises(ValueError, match="resolution"):
        bake_texture(sphere, COLOR_AT, resolution=0)
    with pytest.raises(ValueError, match="padding"):
        bake_texture(sphere, COLOR_AT, resolution=64, padding=-1)
    with pytest.raises(ValueError, match="color_at must return"):
        bake_texture(sphere, lambda p: np.zeros((len(p), 4)), resolution=64)


# --- GLB export ----------------------------------------------------------------------------------


def test_glb_reads_back_with_trimesh(baked: TexturedMesh, glb: bytes) -> None:
    loaded = load_glb(glb)
    assert len(loaded.vertices) == baked.vertex_count
    np.testing.assert_array_equal(loaded.vertices, baked.vertices)
    np.testing.assert_array_equal(loaded.faces, baked.faces)
    visual: Any = loaded.visual
    assert isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None
    # trimesh keeps UVs in OBJ's bottom-left convention, so it flips glTF's v on load.
    np.testing.assert_allclose(visual.uv, np.column_stack([baked.uvs[:, 0], 1 - baked.uvs[:, 1]]), atol=1e-6)
    material: Any = visual.material
    assert isinstance(material, trimesh.visual.material.PBRMaterial)
    assert material.baseColorTexture.size == (RESOLUTION, RESOLUTION)
    assert material.metallicFactor == 0 and material.roughnessFactor == 1
    np.testing.assert_array_equal(np.asarray(material.baseColorTexture), np.asarray(baked.texture))


def test_trimesh_samples_vertex_colors_from_the_glb(baked: TexturedMesh, glb: bytes) -> None:
    # trimesh's own texture lookup (nearest texel, its own flip) agrees with color_at: the
    # orientation holds for an independent reader, not just for this file's sampler.
    visual: Any = load_glb(glb).visual
    colors = visual.to_color().vertex_colors[:, :3] / 255.0
    err = np.abs(colors - COLOR_AT(baked.vertices))
    assert err.max() < 0.06 and err.mean() < 0.01


def test_glb_structure(baked: TexturedMesh, glb: bytes) -> None:
    doc, bin_chunk = parse_glb(glb)
    assert doc["asset"]["version"] == "2.0"
    assert doc["buffers"] == [{"byteLength": len(bin_chunk)}]
    prim = doc["meshes"][0]["primitives"][0]
    accessors = doc["accessors"]
    attributes = prim["attributes"]
    pos, uv, idx = accessors[attributes["POSITION"]], accessors[attributes["TEXCOORD_0"]], accessors[prim["indices"]]
    assert pos["count"] == uv["count"] == baked.vertex_count
    assert (pos["type"], uv["type"], uv["componentType"]) == ("VEC3", "VEC2", 5126)
    assert idx["count"] == 3 * baked.face_count and idx["componentType"] == 5125
    assert pos["min"] == baked.vertices.min(axis=0).tolist() and pos["max"] == baked.vertices.max(axis=0).tolist()
    for view in doc["bufferViews"]:
        assert view["byteOffset"] % 4 == 0 and view["byteOffset"] + view["byteLength"] <= len(bin_chunk)

    def view_bytes(index: int) -> bytes:
        view = doc["bufferViews"][index]
        return bin_chunk[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]

    np.testing.assert_array_equal(np.frombuffer(view_bytes(uv["bufferView"]), "<f4").reshape(-1, 2), baked.uvs)
    np.testing.assert_array_equal(np.frombuffer(view_bytes(idx["bufferView"]), "<u4").reshape(-1, 3), baked.faces)

    material = doc["materials"][prim["material"]]
    pbr = material["pbrMetallicRoughness"]
    assert (pbr["metallicFactor"], pbr["roughnessFactor"]) == (0.0, 1.0)
    texture = doc["textures"][pbr["baseColorTexture"]["index"]]
    assert doc["samplers"][texture["sampler"]] == {"magFilter": 9729, "minFilter": 9729, "wrapS": 33071, "wrapT": 33071}
    image = doc["images"][texture["source"]]
    assert image["mimeType"] == "image/png" and "uri" not in image
    png = view_bytes(image["bufferView"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(png))
    assert decoded.size == (RESOLUTION, RESOLUTION)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(baked.texture))


def test_glb_textured_accepts_rgb_and_rejects_empty(baked: TexturedMesh) -> None:
    rgb = TexturedMesh(vertices=baked.vertices, faces=baked.faces, uvs=baked.uvs, texture=baked.texture.convert("RGB"))
    doc, _ = parse_glb(export_glb_textured(rgb))
    assert doc["images"][0]["mimeType"] == "image/png"
    empty = TexturedMesh(
        vertices=np.zeros((3, 3), np.float32),
        faces=np.zeros((0, 3), np.int64),
        uvs=np.zeros((3, 2), np.float32),
        texture=Image.new("RGB", (4, 4)),
    )
    with pytest.raises(ValueError, match="no faces"):
        export_glb_textured(empty)


def test_glb_textured_embeds_png_even_for_a_texture_read_from_jpeg(baked: TexturedMesh) -> None:
    # trimesh passes an image that came from a JPEG file through as JPEG; the export must not.
    buffer = io.BytesIO()
    baked.texture.convert("RGB").save(buffer, format="JPEG")
    jpeg = Image.open(io.BytesIO(buffer.getvalue()))
    assert jpeg.format == "JPEG"
    mesh = TexturedMesh(vertices=baked.vertices, faces=baked.faces, uvs=baked.uvs, texture=jpeg)
    doc, bin_chunk = parse_glb(export_glb_textured(mesh))
    assert doc["images"] == [{"bufferView": doc["images"][0]["bufferView"], "mimeType": "image/png"}]
    view = doc["bufferViews"][doc["images"][0]["bufferView"]]
    png = bin_chunk[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(jpeg))


# --- timing (printed, not asserted) -------------------------------------------------------------


def test_bake_timing_20k_faces(capsys: pytest.CaptureFixture[str]) -> None:
    mesh = uv_sphere(1.0, 142, 71)  # 19,880 faces
    lines = []
    for resolution in (1024, 2048):
        start = time.perf_counter()
        baked = bake_texture(mesh, position_color((0, 0, 0), 1.0), resolution=resolution)
        bake_s = time.perf_counter() - start
        start = time.perf_counter()
        export_glb_textured(baked)
        export_s = time.perf_counter() - start
        lines.append(f"bake {mesh.face_count} faces at {resolution}^2: {bake_s:.2f} s (+ GLB export {export_s:.2f} s)")
        assert baked.face_count == mesh.face_count
    with capsys.disabled():
        print("\n" + "\n".join(lines))

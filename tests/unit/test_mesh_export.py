"""Unit tests for kiln_mesh.mesh and kiln_mesh.export: the test sphere, frame change, and file writers.

Files are read back with trimesh (a test-only dependency) so the writers are checked against an
independent reader, not against themselves.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trimesh

from kiln_mesh.export import (
    EXTENSIONS,
    MEDIA_TYPES,
    MeshFormat,
    export_glb,
    export_mesh,
    export_obj,
    export_ply,
)
from kiln_mesh.mesh import NATIVE_TO_Y_UP, Mesh, to_y_up, transform, uv_sphere

CENTER = (0.25, -0.5, 1.0)


def face_normals(mesh: Mesh) -> npt.NDArray[np.float64]:
    tri = mesh.vertices.astype(np.float64)[mesh.faces.astype(np.int64)]
    return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


def outward_dots(mesh: Mesh, center: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Per face: dot(right-hand normal, centroid - center); > 0 when the face points outward."""
    tri = mesh.vertices.astype(np.float64)[mesh.faces.astype(np.int64)]
    centroids = tri.mean(axis=1)
    dots = np.einsum("ij,ij->i", face_normals(mesh), centroids - np.asarray(center, dtype=np.float64))
    return np.asarray(dots, dtype=np.float64)


def colourful_sphere() -> Mesh:
    """A sphere whose colours are seeded noise incl. 0 and 255, so a shuffled channel or row shows."""
    sphere = uv_sphere(1.5, 24, 12, center=CENTER)
    rng = np.random.default_rng(1234)
    colors = rng.integers(0, 256, size=(sphere.vertex_count, 3), dtype=np.uint8)
    colors[0] = (0, 128, 255)
    colors[1] = (255, 1, 254)
    return Mesh(vertices=sphere.vertices, faces=sphere.faces, vertex_colors=colors)


def load_back(data: bytes, file_type: str) -> trimesh.Trimesh:
    # process=False keeps vertex order and count (no merging), so arrays compare row for row.
    loaded: Any = trimesh.load(io.BytesIO(data), file_type=file_type, process=False, force="mesh")
    assert isinstance(loaded, trimesh.Trimesh)
    return loaded


# --- uv_sphere ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("segments", "rings"), [(3, 2), (8, 3), (32, 16), (7, 11)])
def test_uv_sphere_is_closed_and_consistently_wound(segments: int, rings: int) -> None:
    sphere = uv_sphere(2.0, segments, rings, center=CENTER)
    assert sphere.vertex_count == 2 + segments * (rings - 1)
    assert sphere.face_count == 2 * segments * (rings - 1)
    faces = sphere.faces.astype(np.int64)
    assert (faces[:, 0] != faces[:, 1]).all()
    assert (faces[:, 1] != faces[:, 2]).all()
    assert (faces[:, 2] != faces[:, 0]).all()
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    # Closed: every undirected edge is shared by exactly two faces.
    _, counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    assert (counts == 2).all()
    # Consistent orientation: each directed edge occurs once (its twin runs the other way).
    _, directed_counts = np.unique(directed, axis=0, return_counts=True)
    assert (directed_counts == 1).all()


@pytest.mark.parametrize(("segments", "rings"), [(3, 2), (8, 3), (32, 16)])
def test_uv_sphere_faces_point_outward(segments: int, rings: int) -> None:
    sphere = uv_sphere(2.0, segments, rings, center=CENTER)
    assert (outward_dots(sphere, CENTER) > 0).all()


def test_uv_sphere_vertices_lie_on_the_sphere_with_position_colours() -> None:
    sphere = uv_sphere(3.0, 16, 9, center=CENTER)
    assert sphere.vertices.dtype == np.float32
    offset = sphere.vertices.astype(np.float64) - np.asarray(CENTER)
    np.testing.assert_allclose(np.linalg.norm(offset, axis=1), 3.0, rtol=1e-6)
    expected = np.rint((offset / 3.0 + 1.0) / 2.0 * 255.0)
    np.testing.assert_allclose(sphere.vertex_colors, expected, atol=1)  # float32 positions may tip a rounding
    assert sphere.vertex_colors[0].tolist() == [128, 128, 255]  # the +Z pole


def test_uv_sphere_is_deterministic() -> None:
    a, b = uv_sphere(1.0, 20, 10), uv_sphere(1.0, 20, 10)
    assert a.vertices.tobytes() == b.vertices.tobytes()
    assert a.faces.tobytes() == b.faces.tobytes()
    assert a.vertex_colors.tobytes() == b.vertex_colors.tobytes()


@pytest.mark.parametrize(
    ("radius", "segments", "rings"),
    [(0.0, 8, 4), (-1.0, 8, 4), (float("nan"), 8, 4), (1.0, 2, 4), (1.0, 8, 1)],
)
def test_uv_sphere_rejects_bad_arguments(radius: float, segments: int, rings: int) -> None:
    with pytest.raises(ValueError, match=r"radius|segments|rings"):
        uv_sphere(radius, segments, rings)


# --- Mesh validation ---------------------------------------------------------------------------


def test_mismatched_colour_count_raises() -> None:
    sphere = uv_sphere(1.0, 8, 4)
    with pytest.raises(ValueError, match="vertex_colors has"):
        Mesh(vertices=sphere.vertices, faces=sphere.faces, vertex_colors=sphere.vertex_colors[:-1])


def _tri(**override: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "vertices": np.zeros((3, 3), dtype=np.float32),
        "faces": np.array([[0, 1, 2]], dtype=np.int64),
        "vertex_colors": np.zeros((3, 3), dtype=np.uint8),
    }
    fields.update(override)
    return fields


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"vertices": np.zeros((3, 3), dtype=np.float64)}, "vertices must be float32"),
        ({"vertices": np.zeros((3, 2), dtype=np.float32)}, r"vertices must be an \(N, 3\)"),
        ({"vertices": np.array([[0, 0, 0], [1, 0, 0], [np.nan, 0, 0]], dtype=np.float32)}, "finite"),
        ({"faces": np.array([[0, 1, 2]], dtype=np.int32)}, "int64 or uint32"),
        ({"faces": np.array([0, 1, 2], dtype=np.int64)}, r"faces must be an \(M, 3\)"),
        ({"faces": np.array([[0, 1, 3]], dtype=np.int64)}, r"\[0, 3\)"),
        ({"faces": np.array([[0, -1, 2]], dtype=np.int64)}, r"\[0, 3\)"),
        ({"vertex_colors": np.zeros((3, 3), dtype=np.float32)}, "uint8"),
        ({"vertex_colors": np.zeros((3, 4), dtype=np.uint8)}, r"vertex_colors must be an \(N, 3\)"),
    ],
)
def test_mesh_rejects_bad_arrays(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mesh(**_tri(**override))


def test_mesh_accepts_uint32_faces_and_counts() -> None:
    mesh = Mesh(**_tri(faces=np.array([[0, 1, 2]], dtype=np.uint32)))
    assert (mesh.vertex_count, mesh.face_count) == (3, 1)


# --- frame change --------------------------------------------------------------------------------


def test_native_to_y_up_is_a_proper_rotation() -> None:
    assert np.linalg.det(NATIVE_TO_Y_UP) == pytest.approx(1.0)
    np.testing.assert_allclose(NATIVE_TO_Y_UP @ NATIVE_TO_Y_UP.T, np.eye(3), atol=1e-12)


def test_to_y_up_maps_a_known_point_as_documented() -> None:
    vertices = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    mesh = to_y_up(Mesh(**_tri(vertices=vertices)))
    # (x, y, z) -> (-y, z, -x), the reference app's rotation: native up (+Z) becomes +Y.
    np.testing.assert_array_equal(mesh.vertices, [[-2.0, 3.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])


def test_to_y_up_keeps_winding_outward_and_colours() -> None:
    sphere = colourful_sphere()
    moved = to_y_up(sphere)
    assert (outward_dots(moved, NATIVE_TO_Y_UP @ np.asarray(CENTER)) > 0).all()
    np.testing.assert_array_equal(moved.faces, sphere.faces)
    np.testing.assert_array_equal(moved.vertex_colors, sphere.vertex_colors)


def test_transform_with_a_mirror_flips_faces_to_stay_outward() -> None:
    # If NATIVE_TO_Y_UP is ever swapped for an improper (mirroring) matrix, winding must survive.
    mirror = np.diag([1.0, 1.0, -1.0])
    sphere = uv_sphere(1.0, 12, 6, center=CENTER)
    mirrored = transform(sphere, mirror)
    assert (outward_dots(mirrored, mirror @ np.asarray(CENTER)) > 0).all()
    np.testing.assert_array_equal(mirrored.faces, sphere.faces[:, ::-1])


def test_transform_rejects_singular_matrix() -> None:
    with pytest.raises(ValueError, match="invertible"):
        transform(uv_sphere(1.0, 8, 4), np.diag([1.0, 1.0, 0.0]))


# --- export: read back with trimesh -------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(MeshFormat))
def test_export_reads_back_with_trimesh(fmt: MeshFormat) -> None:
    mesh = colourful_sphere()
    loaded = load_back(export_mesh(mesh, fmt), EXTENSIONS[fmt])
    assert len(loaded.vertices) == mesh.vertex_count
    assert len(loaded.faces) == mesh.face_count
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    # Vertex colours must come back as colours, not as a texture or an ignored attribute.
    assert isinstance(loaded.visual, trimesh.visual.ColorVisuals)
    assert loaded.visual.kind == "vertex"
    colors = np.asarray(loaded.visual.vertex_colors)[:, :3].astype(np.int64)
    if fmt is MeshFormat.OBJ:
        # OBJ carries colours as decimal floats in [0, 1]; allow one step of rounding.
        assert np.abs(colors - mesh.vertex_colors).max() <= 1
    else:
        np.testing.assert_array_equal(colors, mesh.vertex_colors)


@pytest.mark.parametrize("fmt", list(MeshFormat))
def test_exported_winding_stays_outward(fmt: MeshFormat) -> None:
    mesh = to_y_up(uv_sphere(1.0, 16, 8))
    loaded = load_back(export_mesh(mesh, fmt), EXTENSIONS[fmt])
    tri = np.asarray(loaded.vertices)[np.asarray(loaded.faces)]
    dots = np.einsum("ij,ij->i", np.asarray(loaded.face_normals), tri.mean(axis=1))
    assert (dots > 0).all()


def test_export_mesh_dispatches_to_each_writer() -> None:
    mesh = uv_sphere(1.0, 8, 4)
    assert export_mesh(mesh, MeshFormat.GLB) == export_glb(mesh)
    assert export_mesh(mesh, MeshFormat.OBJ) == export_obj(mesh)
    assert export_mesh(mesh, MeshFormat.PLY) == export_ply(mesh)


def test_every_format_has_a_media_type_and_extension() -> None:
    assert set(MEDIA_TYPES) == set(MeshFormat) == set(EXTENSIONS)
    assert MEDIA_TYPES[MeshFormat.GLB] == "model/gltf-binary"
    assert MEDIA_TYPES[MeshFormat.OBJ] == "model/obj"
    assert {EXTENSIONS[f] for f in MeshFormat} == {"glb", "obj", "ply"}


@pytest.mark.parametrize("fmt", list(MeshFormat))
def test_export_is_deterministic(fmt: MeshFormat) -> None:
    first = export_mesh(colourful_sphere(), fmt)
    second = export_mesh(colourful_sphere(), fmt)
    assert first == second


@pytest.mark.parametrize("fmt", list(MeshFormat))
def test_export_rejects_a_mesh_without_faces(fmt: MeshFormat) -> None:
    empty = Mesh(**_tri(faces=np.zeros((0, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match="no faces"):
        export_mesh(empty, fmt)


@pytest.mark.parametrize("fmt", list(MeshFormat))
def test_export_accepts_uint32_faces(fmt: MeshFormat) -> None:
    mesh = colourful_sphere()
    as_u32 = Mesh(vertices=mesh.vertices, faces=mesh.faces.astype(np.uint32), vertex_colors=mesh.vertex_colors)
    assert export_mesh(as_u32, fmt) == export_mesh(mesh, fmt)


# --- export: format details ----------------------------------------------------------------------


def parse_glb(data: bytes) -> tuple[dict[str, Any], bytes]:
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF"
    assert version == 2
    assert length == len(data)
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON"
    assert json_len % 4 == 0
    json_bytes = data[20 : 20 + json_len]
    bin_header = 20 + json_len
    bin_len, bin_type = struct.unpack_from("<I4s", data, bin_header)
    assert bin_type == b"BIN\x00"
    assert bin_len % 4 == 0
    assert bin_header + 8 + bin_len == len(data)
    document: dict[str, Any] = json.loads(json_bytes.decode("utf-8"))
    return document, data[bin_header + 8 : bin_header + 8 + bin_len]


def test_glb_structure_and_accessors() -> None:
    mesh = colourful_sphere()
    doc, bin_chunk = parse_glb(export_glb(mesh))
    assert doc["asset"] == {"version": "2.0", "generator": "kiln"}
    assert doc["scenes"][doc["scene"]]["nodes"] == [0]
    assert doc["buffers"][0]["byteLength"] <= len(bin_chunk)
    (primitive,) = doc["meshes"][doc["nodes"][0]["mesh"]]["primitives"]
    assert primitive["mode"] == 4

    def read(index: int, dtype: str, width: int) -> npt.NDArray[Any]:
        accessor = doc["accessors"][index]
        view = doc["bufferViews"][accessor["bufferView"]]
        offset = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
        assert offset % 4 == 0
        assert view.get("byteStride", 4) % 4 == 0
        return np.frombuffer(bin_chunk, dtype=dtype, count=accessor["count"] * width, offset=offset).reshape(
            accessor["count"], width
        )

    position = doc["accessors"][primitive["attributes"]["POSITION"]]
    assert (position["componentType"], position["type"]) == (5126, "VEC3")
    positions = read(primitive["attributes"]["POSITION"], "<f4", 3)
    np.testing.assert_array_equal(positions, mesh.vertices)
    # The spec requires min/max on POSITION, and they must be the exact bounds.
    assert position["min"] == positions.min(axis=0).tolist()
    assert position["max"] == positions.max(axis=0).tolist()

    color = doc["accessors"][primitive["attributes"]["COLOR_0"]]
    assert (color["componentType"], color["type"], color["normalized"]) == (5121, "VEC4", True)
    assert doc["bufferViews"][color["bufferView"]]["byteStride"] == 4
    rgba = read(primitive["attributes"]["COLOR_0"], "u1", 4)
    np.testing.assert_array_equal(rgba[:, :3], mesh.vertex_colors)
    assert (rgba[:, 3] == 255).all()

    indices = doc["accessors"][primitive["indices"]]
    assert (indices["componentType"], indices["type"]) == (5125, "SCALAR")
    assert "byteStride" not in doc["bufferViews"][indices["bufferView"]]
    np.testing.assert_array_equal(read(primitive["indices"], "<u4", 1).reshape(-1, 3), mesh.faces)


def test_glb_json_chunk_is_space_padded() -> None:
    # A 3-vertex mesh gives a JSON length that is rarely a multiple of 4; check the padding byte.
    data = export_glb(Mesh(**_tri(vertices=np.eye(3, dtype=np.float32))))
    json_len = struct.unpack_from("<I", data, 12)[0]
    text = data[20 : 20 + json_len]
    # Zero padding would leave NULs, which json rejects as extra data; spaces are whitespace.
    assert b"\x00" not in text
    json.loads(text.decode("utf-8"))


def test_ply_header() -> None:
    data = export_ply(uv_sphere(1.0, 8, 4))
    header, _, body = data.partition(b"end_header\n")
    lines = header.decode("ascii").splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    assert "element vertex 26" in lines
    assert "element face 48" in lines
    assert "property list uchar int vertex_indices" in lines
    assert len(body) == 26 * 15 + 48 * 13


def test_obj_lines() -> None:
    mesh = Mesh(
        vertices=np.array([[0.0, 0.5, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32),
        faces=np.array([[0, 1, 2]], dtype=np.int64),
        vertex_colors=np.array([[255, 0, 51], [0, 0, 0], [255, 255, 255]], dtype=np.uint8),
    )
    lines = export_obj(mesh).decode("ascii").splitlines()
    assert lines[0].startswith("#")
    assert lines[1:] == [
        "v 0 0.5 -1 1 0 0.2",
        "v 1 0 0 0 0 0",
        "v 0 1 0 1 1 1",
        "f 1 2 3",
    ]


def test_obj_positions_round_trip_float32_exactly() -> None:
    rng = np.random.default_rng(7)
    vertices = rng.normal(scale=100.0, size=(3, 3)).astype(np.float32)
    data = export_obj(Mesh(**_tri(vertices=vertices)))
    parsed = np.array(
        [line.split()[1:4] for line in data.decode("ascii").splitlines() if line.startswith("v ")], dtype=np.float64
    )
    np.testing.assert_array_equal(parsed.astype(np.float32), vertices)


# --- same content as trimesh's writers (the baseline of benchmarks/mesh_export.py) ----------------


@pytest.mark.parametrize("fmt", list(MeshFormat))
def test_export_carries_what_trimesh_writes(fmt: MeshFormat) -> None:
    # Kiln keeps its own writers only because they are faster; they must not carry less than
    # trimesh's for the same mesh (positions, faces and winding, vertex colours).
    mesh = to_y_up(colourful_sphere())
    theirs_raw = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=mesh.vertex_colors, process=False).export(
        file_type=fmt.value
    )
    theirs = load_back(theirs_raw.encode("ascii") if isinstance(theirs_raw, str) else theirs_raw, fmt.value)
    ours = load_back(export_mesh(mesh, fmt), fmt.value)
    np.testing.assert_allclose(ours.vertices, theirs.vertices, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours.faces, theirs.faces)
    assert ours.visual.kind == theirs.visual.kind == "vertex"
    ours_rgb = np.asarray(ours.visual.vertex_colors)[:, :3].astype(np.int64)
    theirs_rgb = np.asarray(theirs.visual.vertex_colors)[:, :3].astype(np.int64)
    assert np.abs(ours_rgb - theirs_rgb).max() <= (1 if fmt is MeshFormat.OBJ else 0)


def test_obj_colours_follow_the_position_as_trimesh_writes_them() -> None:
    mesh = Mesh(**_tri(vertices=np.eye(3, dtype=np.float32), vertex_colors=np.full((3, 3), 255, np.uint8)))
    theirs = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=mesh.vertex_colors, process=False)
    their_v = [line.split() for line in str(theirs.export(file_type="obj")).splitlines() if line.startswith("v ")]
    our_v = [line.split() for line in export_obj(mesh).decode("ascii").splitlines() if line.startswith("v ")]
    # Both: "v x y z r g b" with colours as floats in [0, 1].
    assert [len(v) for v in our_v] == [len(v) for v in their_v] == [7, 7, 7]
    assert [float(c) for v in our_v for c in v[4:]] == [float(c) for v in their_v for c in v[4:]] == [1.0] * 9


def test_glb_colour_accessor_is_what_trimesh_writes() -> None:
    mesh = colourful_sphere()
    theirs = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=mesh.vertex_colors, process=False)
    their_doc, _ = parse_glb(bytes(theirs.export(file_type="glb")))
    our_doc, _ = parse_glb(export_glb(mesh))
    for doc in (their_doc, our_doc):
        (primitive,) = doc["meshes"][0]["primitives"]
        color = doc["accessors"][primitive["attributes"]["COLOR_0"]]
        assert (color["componentType"], color["type"]) == (5121, "VEC4")

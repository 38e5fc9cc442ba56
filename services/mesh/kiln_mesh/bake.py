"""Texture baking without a display: xatlas UV atlas, a numpy rasteriser, and a per-texel colour query.

TripoSR's reference baker rasterises the atlas with OpenGL (moderngl), so it fails on headless
servers. Here the same steps run on the CPU: xatlas unwraps the mesh, a vectorised software
rasteriser writes the interpolated 3-D position of every texel centre that falls inside a
triangle, a gutter around the charts takes the position of the nearest covered texel (so bilinear
filtering at UV seams never mixes in black), and the caller's colour field is queried once for
all of those positions.

UV convention: the rasteriser works directly in glTF's, where UV (0, 0) is the top-left corner of
the image, u grows to the right and v grows *down*: the texel in row ``r`` and column ``c`` has its
centre at ``((c + 0.5) / R, (r + 0.5) / R)``. xatlas' coordinates carry no up or down of their own
(the packer just places charts in a rectangle), so its UVs are used unchanged and the image is
written row 0 first; no flip is needed anywhere. The reference baker needs a flip only because
OpenGL's framebuffer and OBJ put v = 0 at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import xatlas  # type: ignore[import-not-found]  # a compiled extension with no type information
from PIL import Image
from scipy import ndimage  # type: ignore[import-untyped]  # no stubs installed (scipy-stubs)

from kiln_mesh.mesh import Mesh, TexturedMesh

__all__ = ["AtlasRaster", "ColorAt", "bake_texture", "default_padding", "rasterize_positions"]

ColorAt: TypeAlias = Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]]
"""World positions (K, 3) float32 -> RGB (K, 3) floats in [0, 1]; chunking is the callee's business."""

# Texel evaluations per rasteriser batch (triangles x bounding-box texels). Each costs a handful of
# float64 temporaries, so 2**20 keeps a batch around 50 MB while amortising numpy's per-call cost.
_BATCH_TEXELS: Final = 1 << 20
# A texel centre exactly on an edge shared by two triangles must land in at least one of them;
# a tiny negative tolerance on the barycentric weights absorbs the rounding that would otherwise
# leave pin-holes along diagonals.
_INSIDE_EPS: Final = 1e-9
# UV triangles with less (twice-)area than this, in texels squared, have no usable barycentrics.
_MIN_AREA2: Final = 1e-12


@dataclass(frozen=True, eq=False)
class AtlasRaster:
    """The rasterised position atlas, before colours are queried.

    Attributes:
        positions: (R, R, 3) float32 world position per texel; zero where neither mask is set.
        covered: (R, R) bool, texels whose centre lies inside a triangle (plus one texel for
            each triangle too small to contain any texel centre).
        gutter: (R, R) bool, texels within the padding distance of a covered texel but not
            covered themselves; they hold the nearest covered texel's position.
    """

    positions: npt.NDArray[np.float32]
    covered: npt.NDArray[np.bool_]
    gutter: npt.NDArray[np.bool_]


def default_padding(resolution: int) -> int:
    """The reference baker's chart padding in texels: ``round(max(2, resolution / 256))``."""
    return round(max(2.0, resolution / 256))


def bake_texture(mesh: Mesh, color_at: ColorAt, *, resolution: int, padding: int | None = None) -> TexturedMesh:
    """UV-unwrap ``mesh`` and bake ``color_at`` into a square RGBA texture.

    Steps: an xatlas atlas (pack resolution ``resolution``, ``padding`` texels between charts,
    bilinear-safe packing), as in TripoSR's baker; vertices are duplicated along UV seams through
    xatlas' vertex mapping. Then `rasterize_positions` and one ``color_at`` call for every covered
    or gutter texel. Texels outside both stay (0, 0, 0, 0): alpha tells a viewer or tool where the
    texture is meaningless, and glTF's default OPAQUE mode ignores it when drawing.

    xatlas sizes its own atlas only approximately (it can come out e.g. 1789 x 2416 for 2048), so
    its normalised UVs are mapped onto the square ``resolution`` texture, a mild anisotropic
    stretch that the reference accepts too.

    Args:
        mesh: The mesh to bake; its vertex colours are ignored.
        color_at: The colour field, called once with all texel positions that need a colour.
        resolution: Texture width and height in texels, >= 1.
        padding: Chart spacing and gutter width in texels, >= 0; default `default_padding`.

    Returns:
        The re-indexed mesh (faces in the input order and winding) with glTF UVs and the texture.

    Raises:
        ValueError: If the mesh has no faces, an argument is out of range, or ``color_at``
            returns the wrong shape.
        RuntimeError: If xatlas splits the charts over several atlases.
    """
    if mesh.face_count == 0:
        raise ValueError("cannot bake a mesh with no faces")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    pad = default_padding(resolution) if padding is None else padding
    if pad < 0:
        raise ValueError(f"padding must be >= 0, got {pad}")

    vmapping, faces, uvs = _unwrap(mesh, resolution, pad)
    vertices = np.ascontiguousarray(mesh.vertices[vmapping])
    raster = rasterize_positions(vertices, faces, uvs, resolution=resolution, padding=pad)

    texture = np.zeros((resolution, resolution, 4), dtype=np.uint8)
    filled = raster.covered | raster.gutter
    points = raster.positions[filled]
    if len(points):
        rgb = np.asarray(color_at(points), dtype=np.float64)
        if rgb.shape != (len(points), 3):
            raise ValueError(f"color_at must return shape ({len(points)}, 3), got {rgb.shape}")
        # NaN would turn into an arbitrary byte (and a numpy warning); treat it as black.
        rgb = np.clip(np.nan_to_num(rgb, nan=0.0), 0.0, 1.0)
        texture[filled, :3] = np.rint(rgb * 255.0).astype(np.uint8)
        texture[filled, 3] = 255
    return TexturedMesh(vertices=vertices, faces=faces, uvs=uvs, texture=Image.fromarray(texture))


def _unwrap(
    mesh: Mesh, resolution: int, padding: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Run xatlas; return (vertex mapping into ``mesh.vertices``, faces, normalised UVs)."""
    atlas: Any = xatlas.Atlas()
    # The binding takes exactly float32 positions and uint32 indices, C-contiguous.
    atlas.add_mesh(
        np.ascontiguousarray(mesh.vertices, dtype=np.float32),
        np.ascontiguousarray(mesh.faces, dtype=np.uint32),
    )
    pack: Any = xatlas.PackOptions()
    pack.resolution = resolution
    pack.padding = padding
    pack.bilinear = True  # leaves room for the bilinear footprint of every chart edge texel
    atlas.generate(pack_options=pack)
    # With resolution set and texels_per_unit left at 0, xatlas scales the charts to fit one
    # atlas; several would overlap in normalised UV space, so refuse rather than bake garbage.
    if int(atlas.atlas_count) != 1:
        raise RuntimeError(f"xatlas produced {atlas.atlas_count} atlases, expected 1")
    vmapping, indices, uvs = atlas[0]
    return (
        np.asarray(vmapping, dtype=np.int64),
        np.asarray(indices, dtype=np.int64).reshape(-1, 3),
        np.ascontiguousarray(uvs, dtype=np.float32),
    )


def rasterize_positions(
    vertices: npt.NDArray[np.float32],
    faces: npt.NDArray[Any],
    uvs: npt.NDArray[np.float32],
    *,
    resolution: int,
    padding: int,
) -> AtlasRaster:
    """Rasterise world positions into a square UV atlas, with a gutter around the charts.

    A texel is covered when its centre lies inside a triangle's UV footprint (edges included);
    it gets the barycentric interpolation of that triangle's vertex positions. Triangles that
    contain no texel centre at all (slivers, sub-texel triangles) still claim the texel under
    their UV centroid if it is free, so every triangle has colour nearby. Gutter texels (not
    covered, Euclidean distance <= ``padding`` texels to a covered one) copy the nearest covered
    texel's position, which keeps bilinear lookups at chart borders on the surface colour.

    Work is vectorised over batches of triangles with similar bounding boxes (size classes four
    to an octave), so a batch evaluates little more than each triangle's own box.

    Args:
        vertices: (N, 3) float32 world positions.
        faces: (M, 3) integer vertex indices.
        uvs: (N, 2) float32 glTF UVs (origin top-left, v down).
        resolution: Atlas width and height in texels, >= 1.
        padding: Gutter width in texels, >= 0.

    Returns:
        The position atlas and its coverage masks, row 0 at v = 0.

    Raises:
        ValueError: If ``resolution`` < 1 or ``padding`` < 0.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    res = resolution
    positions = np.zeros((res, res, 3), dtype=np.float32)
    covered = np.zeros((res, res), dtype=np.bool_)
    face_idx = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    m = len(face_idx)

    # Texel space: texel (r, c) has its centre at integer point (x=c, y=r).
    tex = np.asarray(uvs, dtype=np.float64)[face_idx] * res - 0.5  # (M, 3, 2)
    world = np.asarray(vertices, dtype=np.float64)[face_idx]  # (M, 3, 3)
    x, y = tex[..., 0], tex[..., 1]
    area2 = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    c0 = np.clip(np.ceil(x.min(axis=1)), 0, res).astype(np.int64)
    c1 = np.clip(np.floor(x.max(axis=1)), -1, res - 1).astype(np.int64)
    r0 = np.clip(np.ceil(y.min(axis=1)), 0, res).astype(np.int64)
    r1 = np.clip(np.floor(y.max(axis=1)), -1, res - 1).astype(np.int64)
    width, height = c1 - c0 + 1, r1 - r0 + 1
    hit = np.zeros(m, dtype=np.bool_)

    live = np.flatnonzero((width > 0) & (height > 0) & (np.abs(area2) > _MIN_AREA2))
    # Batches of equal size class, so a batch evaluates little more than its triangles' boxes.
    wclass = _size_class(width[live])
    hclass = _size_class(height[live])
    order = np.lexsort((live, wclass, hclass))  # deterministic: by class, then face index
    live, wclass, hclass = live[order], wclass[order], hclass[order]
    bounds = np.flatnonzero(np.diff(wclass) | np.diff(hclass)) + 1
    for group in np.split(np.arange(len(live)), bounds):
        if not len(group):
            continue
        bw, bh = int(wclass[group[0]]), int(hclass[group[0]])
        step = max(1, _BATCH_TEXELS // (bw * bh))
        for start in range(0, len(group), step):
            tris = live[group[start : start + step]]
            _raster_batch(tris, bw, bh, x, y, area2, world, c0, r0, width, height, positions, covered, hit)

    # Triangles that own no texel centre: splat the UV centroid, only onto free texels.
    empty = np.flatnonzero(~hit)
    if len(empty):
        cx = np.clip(np.floor(x[empty].mean(axis=1) + 0.5), 0, res - 1).astype(np.int64)
        cy = np.clip(np.floor(y[empty].mean(axis=1) + 0.5), 0, res - 1).astype(np.int64)
        free = ~covered[cy, cx]
        empty, cx, cy = empty[free], cx[free], cy[free]
        positions[cy, cx] = world[empty].mean(axis=1).astype(np.float32)
        covered[cy, cx] = True

    gutter = np.zeros_like(covered)
    if padding > 0 and covered.any() and not covered.all():
        # The nearest covered texel of every texel (exact Euclidean feature transform). Distances
        # are then squared integers, computed only for the free texels: exact, and cheaper than
        # scipy's float distance map over the whole atlas.
        nearest = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
        free_r, free_c = np.nonzero(~covered)
        near_r, near_c = nearest[0][free_r, free_c], nearest[1][free_r, free_c]
        close = (near_r - free_r) ** 2 + (near_c - free_c) ** 2 <= padding * padding
        free_r, free_c = free_r[close], free_c[close]
        gutter[free_r, free_c] = True
        positions[free_r, free_c] = positions[near_r[close], near_c[close]]
    return AtlasRaster(positions=positions, covered=covered, gutter=gutter)


def _size_class(n: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Round box sizes (>= 1) up to four steps per octave: 1..8, 10, 12, 14, 16, 20, 24, ...

    Finer than powers of two (which waste up to 4x in two dimensions, about 2x on real atlases),
    yet few enough classes that per-batch overhead stays negligible.
    """
    octave = np.floor(np.log2(n)).astype(np.int64)
    step = np.left_shift(1, np.maximum(octave - 2, 0))
    return np.asarray(-(-n // step) * step, dtype=np.int64)


def _raster_batch(
    tris: npt.NDArray[np.int64],
    bw: int,
    bh: int,
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    area2: npt.NDArray[np.float64],
    world: npt.NDArray[np.float64],
    c0: npt.NDArray[np.int64],
    r0: npt.NDArray[np.int64],
    width: npt.NDArray[np.int64],
    height: npt.NDArray[np.int64],
    positions: npt.NDArray[np.float32],
    covered: npt.NDArray[np.bool_],
    hit: npt.NDArray[np.bool_],
) -> None:
    """Rasterise the triangles ``tris`` whose boxes fit ``bw`` x ``bh`` texels, in place."""
    # Box-local texel coordinates keep the numbers small (precise) whatever the atlas size.
    lx = x[tris] - c0[tris, None]  # (T, 3)
    ly = y[tris] - r0[tris, None]
    inv = 1.0 / area2[tris]
    # Barycentric weight i is the edge function of the opposite edge (j, k) over twice the signed
    # area, a linear function A*X + B*Y + C of the texel; valid for either UV winding, so a
    # mirrored chart rasterises too. Precomputing A, B, C per triangle makes each weight one
    # broadcast add over the (T, bh, bw) grid instead of a dozen full-size temporaries.
    coef = []
    for j, k in ((1, 2), (2, 0), (0, 1)):  # the edge opposite vertex 0, 1, 2
        ex, ey = lx[:, k] - lx[:, j], ly[:, k] - ly[:, j]
        coef.append((-ey * inv, ex * inv, (ey * lx[:, j] - ex * ly[:, j]) * inv))
    xs = np.arange(bw, dtype=np.float64)[None, :]
    ys = np.arange(bh, dtype=np.float64)[None, :]
    # Columns/rows past a triangle's own box (the class is rounded up) are pushed to -inf in the
    # first weight, so the box test costs nothing extra on the full grid.
    x_out = np.where(xs < width[tris, None], 0.0, -np.inf)
    y_out = np.where(ys < height[tris, None], 0.0, -np.inf)
    inside = np.empty((len(tris), bh, bw), dtype=np.bool_)
    weight = np.empty((len(tris), bh, bw), dtype=np.float64)
    for n, (a, b, c) in enumerate(coef):
        col_term = a[:, None] * xs
        row_term = b[:, None] * ys + c[:, None]
        if n == 0:
            col_term += x_out
            row_term += y_out
        np.add(col_term[:, None, :], row_term[:, :, None], out=weight)
        if n == 0:
            np.greater_equal(weight, -_INSIDE_EPS, out=inside)
        else:
            inside &= weight >= -_INSIDE_EPS
    t, iy, ix = np.nonzero(inside)
    if not len(t):
        return
    # Re-evaluate the three weights only at the K covered texels.
    fx, fy = ix.astype(np.float64), iy.astype(np.float64)
    w = [a[t] * fx + b[t] * fy + c[t] for a, b, c in coef]
    tri = tris[t]
    p = world[tri]  # (K, 3, 3)
    pos = w[0][:, None] * p[:, 0] + w[1][:, None] * p[:, 1] + w[2][:, None] * p[:, 2]
    rr, cc = r0[tri] + iy, c0[tri] + ix
    positions[rr, cc] = pos.astype(np.float32)
    covered[rr, cc] = True
    hit[tri] = True

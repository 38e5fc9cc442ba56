"""TripoSR on this machine: Kiln's own implementation of the model, meshing and baking.

Weights come as the published `config.yaml` + `model.ckpt` (or `model.safetensors`), from the
HF cache for a hub id (`stabilityai/TripoSR`) or from a local folder. Background removal
uses an explicitly named rembg session created at load time, never per request.

On CUDA the mesh path is resident (`kiln_mesh.extract.extract_mesh_resident`): encode, grid,
marching cubes, merging and colours stay on the GPU, under autocast by default, and only the
finished mesh comes to the host. Elsewhere the host path of `extract_mesh` runs, as before.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image, ImageDraw
from torch import nn

from kiln_mesh.background import BackgroundRemover
from kiln_mesh.bake import bake_texture
from kiln_mesh.config import TripoSRSettings
from kiln_mesh.extract import ColorFn, EmptySurface, ProgressFn, extract_mesh, extract_mesh_resident
from kiln_mesh.mesh import Mesh
from kiln_mesh.preprocess import prepare_mesh_input
from kiln_mesh.providers.base import MeshInput, MeshOutput
from kiln_mesh.triposr import TripoSR, load_triposr
from kiln_runtime import __version__
from kiln_runtime.device import DeviceChoice
from kiln_runtime.errors import FieldViolation, InvalidArgument
from kiln_runtime.model_source import ModelUnavailable, SourceKind, file_sha256, offline_message, resolve
from kiln_runtime.provider import ProgressUpdate, ProviderDescription, Reproducibility, RunContext, Stage
from kiln_runtime.settings import ModelSettings

log = logging.getLogger(__name__)

SETTING_PREFIX = "KILN_MESH"
WEIGHT_FILES = ("config.yaml", "vit_config.json", "model.safetensors", "model.ckpt")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Share of the progress bar per stage: background removal and encoding are short next to
# the density queries at resolution 256 and above.
_ENCODE_DONE, _EXTRACT_DONE = 0.2, 0.9
# The request default, used by the warm-up when its probe finds no better level.
_DEFAULT_THRESHOLD = 25.0


def autocast_dtype(setting: str, device: str) -> torch.dtype | None:
    """The autocast dtype for the `autocast` setting on a device type, or None for none.

    "auto" means float16 on CUDA (closest to float32 of the two half types, see ARCHITECTURE.md)
    and no autocast elsewhere, so CPU outputs stay those of the float32 path.
    """
    if setting == "auto":
        return torch.float16 if device == "cuda" else None
    if setting == "off":
        return None
    return _DTYPES[setting]


def uses_resident_path(setting: str, device: str) -> bool:
    """Whether the `resident_path` setting puts the whole mesh path on the model's device."""
    return setting == "on" or (setting == "auto" and device == "cuda")


class TriplaneSlabs:
    """`TripoSR.grid_density` for one scene code with the plane terms computed once, not per slab.

    A grid point's hidden layer is ``A[x, y] + B[x, z] + C[y, z] + bias`` (the first decoder layer
    split by plane, see `TripoSR.grid_density`). Here ``A``, ``B`` and ``C`` are computed once
    for the whole grid (``3 R^2`` rows of the hidden width, 50 MB at R = 256 in float32) and each
    slab only broadcasts, sums and runs the rest of the decoder. Same operations as
    `TripoSR.grid_density`, on differently sized matrix products, so equal to float rounding.
    """

    def __init__(self, model: TripoSR, scene_code: torch.Tensor, resolution: int) -> None:
        r = model.radius
        channels = model.config.post_processor.out_channels
        first = model.decoder.layers[0]
        if not isinstance(first, nn.Linear):
            raise TypeError(f"the decoder's first layer is {type(first).__name__}, expected Linear")
        device, dtype = scene_code.device, scene_code.dtype
        # The grid and the reference's affine map, as `TripoSR.grid_density` computes them.
        t = (torch.linspace(0.0, 1.0, resolution) * (r - (-r)) + (-r)).to(device)
        u = ((t + r) / (r + r) * 2.0 - 1.0).to(dtype)
        grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), dim=-1)[None]  # [1, R, R, 2] = (width, height)

        def plane(index: int) -> torch.Tensor:
            sampled = F.grid_sample(
                scene_code[index : index + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            return sampled[0].permute(1, 2, 0)  # [R (width axis), R (height axis), C]

        weight = first.weight.to(dtype)
        self._xy = plane(0) @ weight[:, :channels].T  # [X, Y, H]
        self._xz = plane(1) @ weight[:, channels : 2 * channels].T  # [X, Z, H]
        yz = plane(2) @ weight[:, 2 * channels :].T  # [Y, Z, H]
        # The bias folded in once, in the products' dtype: under autocast they are half and a
        # float32 bias would promote every slab's hidden layer to float32.
        self._yz = yz + first.bias.to(yz.dtype)
        self._rest = model.decoder.layers[1:]
        self._bias = model.config.renderer.density_bias
        self.resolution = resolution

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """Activated density on x-rows ``start:stop``, float32 ``[stop - start, R, R]``."""
        hidden = self._xy[start:stop, :, None, :] + self._xz[start:stop, None, :, :] + self._yz[None, :, :, :]
        out = self._rest(hidden.reshape(-1, hidden.shape[-1]))
        del hidden
        density = torch.exp(out[:, 0].float() + self._bias)
        return density.reshape(stop - start, self.resolution, self.resolution)


@contextmanager
def _empty_surface_is_a_bad_threshold() -> Iterator[None]:
    # No surface at the threshold is something the caller can change: a field violation.
    try:
        yield
    except EmptySurface as err:
        raise InvalidArgument([FieldViolation("mc_threshold", str(err))]) from None


class TripoSRMeshProvider:
    """Image → scene codes → density grid → marching cubes → coloured (or baked) mesh."""

    def __init__(self, model: ModelSettings, settings: TripoSRSettings, device: DeviceChoice, *, offline: bool) -> None:
        self.model_settings = model
        self.settings = settings
        self.device = device
        self.offline = offline
        self.autocast = autocast_dtype(settings.autocast, device.device)
        # Under autocast the weights stay float32 and each operation picks its precision.
        self.dtype = torch.float32 if self.autocast is not None else _DTYPES[device.dtype]
        self.resident = uses_resident_path(settings.resident_path, device.device)
        self._model: TripoSR | None = None
        self._revision = model.revision
        self._remover = BackgroundRemover(
            model_name=settings.rembg_model,
            model_path=settings.rembg_model_path,
            offline=offline,
            device=settings.rembg_device,
            model_device=device.device,
        )

    def describe(self) -> ProviderDescription:
        return ProviderDescription(
            kind="local",
            model_id=self.model_settings.id,
            model_revision=self._revision,
            device=self.device.device,
            dtype=self.device.dtype,
            library_versions={"kiln": __version__, "torch": torch.__version__, "numpy": np.__version__},
            reproducibility=Reproducibility.BITWISE_SAME_HARDWARE,
        )

    # -- lifecycle ---------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        folder = self._weights_folder()
        self._model = load_triposr(folder, device=self.device.device, dtype=self.dtype)
        self._remover.load()
        log.info("loaded TripoSR from %s in %.1f s", folder, time.perf_counter() - started)

    def _weights_folder(self) -> Path:
        source = resolve(self.model_settings, setting_prefix=SETTING_PREFIX)
        if source.kind is SourceKind.FOLDER:
            assert source.path is not None
            weights = next((source.path / name for name in WEIGHT_FILES[2:] if (source.path / name).exists()), None)
            if weights is None:
                raise ModelUnavailable(f"{source.path} has no model.ckpt or model.safetensors beside config.yaml")
            self._revision = self._revision or file_sha256(weights)
            return source.path
        if source.kind is SourceKind.SINGLE_FILE:
            raise ModelUnavailable(
                f"{SETTING_PREFIX}__MODEL__ID must name a folder with config.yaml and model.ckpt, or a hub id; "
                f"{source.path} is a single file"
            )
        from huggingface_hub import snapshot_download

        try:
            snapshot = snapshot_download(
                source.id,
                revision=source.revision or None,
                cache_dir=str(source.cache_dir) if source.cache_dir else None,
                local_files_only=self.offline,
                allow_patterns=list(WEIGHT_FILES),
            )
        except Exception as err:  # huggingface_hub raises several types for "not there"
            if self.offline:
                raise ModelUnavailable(offline_message(source, SETTING_PREFIX, err)) from err
            raise ModelUnavailable(f"could not fetch {source.id!r} from the hub: {err}") from err
        self._revision = Path(snapshot).name  # the snapshot folder is the commit hash
        return Path(snapshot)

    def warmup(self) -> None:
        """Run the whole mesh path once at `warmup_resolution` before the first job.

        Background removal (on its chosen provider), encode, grid, marching cubes, merging and
        colours: every kernel and allocation the first request would pay for. A probe of the
        volume picks a threshold the density crosses, so the stages after marching cubes run too.
        """
        model = self._require_model()
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        ImageDraw.Draw(image).ellipse((16, 12, 48, 52), fill=(220, 110, 40))
        self._remover(image)
        resolution = self.settings.warmup_resolution
        scene_code = self._encode(model, image)
        with torch.inference_mode(), self._autocast_context():
            probe = model.grid_density(scene_code, resolution, 0, resolution)
            threshold = float(probe.float().median()) if bool(torch.isfinite(probe).all()) else _DEFAULT_THRESHOLD
        started = time.perf_counter()
        try:
            self._extract(model, scene_code, resolution=resolution, threshold=threshold, colored=True, on_chunk=None)
        except EmptySurface:
            log.info("warm-up: the probe image has no surface at resolution %d; meshing was skipped", resolution)
        log.info("warm-up mesh at resolution %d in %.2f s", resolution, time.perf_counter() - started)

    def close(self) -> None:
        # TripoSR and the rembg session both go; the model manager then empties the device
        # cache (kiln_runtime.memory). `load()` builds both again on the same object.
        self._model = None
        self._remover.close()

    # -- running -----------------------------------------------------------------------

    def _require_model(self) -> TripoSR:
        if self._model is None:
            raise RuntimeError("the model is not loaded")
        return self._model

    def run(self, request: MeshInput, ctx: RunContext) -> MeshOutput:
        model = self._require_model()
        with ctx.phase("remove_background"):
            ctx.report(ProgressUpdate(Stage.REMOVE_BACKGROUND, 0, 0, 0.0))
            image, removed = prepare_mesh_input(
                request.image, mode=request.remove_background, ratio=request.foreground_ratio, remove=self._remover
            )
        with ctx.phase("encode"):
            ctx.report(ProgressUpdate(Stage.ENCODE, 0, 0, 0.05))
            scene_code = self._encode(model, image)
        ctx.check_cancelled()

        def color(points: torch.Tensor) -> torch.Tensor:
            return model.query(scene_code, points)[1]

        def on_chunk(done: int, total: int) -> None:
            # report() raises Cancelled once the client has gone: the next chunk never runs.
            fraction = _ENCODE_DONE + (_EXTRACT_DONE - _ENCODE_DONE) * done / total
            ctx.report(ProgressUpdate(Stage.EXTRACT, done, total, fraction))

        with ctx.phase("extract"), _empty_surface_is_a_bad_threshold():
            mesh = self._extract(
                model,
                scene_code,
                resolution=request.mc_resolution,
                threshold=request.mc_threshold,
                colored=not request.bake_texture,
                on_chunk=on_chunk,
            )
        if not request.bake_texture:
            return MeshOutput(
                background_removed=removed, mesh=mesh, vertex_count=mesh.vertex_count, face_count=mesh.face_count
            )
        with ctx.phase("bake"), torch.inference_mode(), self._autocast_context():
            ctx.report(ProgressUpdate(Stage.EXPORT, 0, 0, _EXTRACT_DONE))
            textured = bake_texture(
                mesh, lambda positions: self._colors_at(color, positions), resolution=request.texture_resolution
            )
        return MeshOutput(
            background_removed=removed,
            textured=textured,
            vertex_count=textured.vertex_count,
            face_count=textured.face_count,
        )

    def _autocast_context(self) -> AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.device, dtype=self.autocast)

    def _encode(self, model: TripoSR, image: Image.Image) -> torch.Tensor:
        """One image's scene code ``[3, C, H, W]`` in the weights' dtype, on the model's device."""
        with torch.inference_mode(), self._autocast_context():
            # float32 in: the model normalises in float32 before casting to its dtype.
            pixels = model.preprocess([image]).to(self.device.device)
            scene_code = model.encode(pixels)[0]
        # Kept in the weights' dtype (float32 under autocast): the queries run under autocast too,
        # which rounds their inputs per operation, and the stored code loses nothing more.
        return scene_code.to(self.dtype)

    def _extract(
        self,
        model: TripoSR,
        scene_code: torch.Tensor,
        *,
        resolution: int,
        threshold: float,
        colored: bool,
        on_chunk: ProgressFn | None,
    ) -> Mesh:
        """Scene code -> mesh on the resident (device) path or the host path."""

        def color(points: torch.Tensor) -> torch.Tensor:
            return model.query(scene_code, points)[1]

        colors: ColorFn | None = color if colored else None
        with torch.inference_mode(), self._autocast_context():
            if self.resident:
                return extract_mesh_resident(
                    TriplaneSlabs(model, scene_code, resolution),
                    colors,
                    resolution=resolution,
                    threshold=threshold,
                    radius=model.radius,
                    slab_points=self.settings.device_slab_points,
                    device=self.device.device,
                    on_chunk=on_chunk,
                )

            def density(points: torch.Tensor) -> torch.Tensor:
                return model.query_density(scene_code, points)

            return extract_mesh(
                density,
                colors,
                resolution=resolution,
                threshold=threshold,
                radius=model.radius,
                chunk_size=self.settings.chunk_size,
                device=self.device.device,
                on_chunk=on_chunk,
                slab_density=lambda start, stop: model.grid_density(scene_code, resolution, start, stop),
            )

    def _colors_at(self, color: Any, positions: np.ndarray) -> np.ndarray:
        """Triplane colours at texel positions, in chunks so large textures stay bounded."""
        out = np.empty((len(positions), 3), dtype=np.float32)
        step = self.settings.chunk_size
        for start in range(0, len(positions), step):
            points = torch.from_numpy(positions[start : start + step]).to(self.device.device, self.dtype)
            out[start : start + step] = color(points).float().cpu().numpy()
        return out

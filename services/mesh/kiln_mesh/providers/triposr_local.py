"""TripoSR on this machine: Kiln's own implementation of the model, meshing and baking.

Weights come as the published `config.yaml` + `model.ckpt` (or `model.safetensors`), from the
HF cache for a hub id (`stabilityai/TripoSR`) or from a local folder. Background removal
uses an explicitly named rembg session created at load time, never per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kiln_mesh.background import BackgroundRemover
from kiln_mesh.bake import bake_texture
from kiln_mesh.config import TripoSRSettings
from kiln_mesh.extract import EmptySurface, extract_mesh
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
        self.dtype = _DTYPES[device.dtype]
        self._model: TripoSR | None = None
        self._revision = model.revision
        self._remover = BackgroundRemover(
            model_name=settings.rembg_model, model_path=settings.rembg_model_path, offline=offline
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
        # One small encode pays the allocator and kernel set-up before the first job.
        model = self._require_model()
        grey = Image.new("RGB", (64, 64), (127, 127, 127))
        with torch.inference_mode():
            model.encode(model.preprocess([grey]).to(self.device.device))

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
            with torch.inference_mode():
                # float32 in: the model normalises in float32 before casting to its dtype.
                pixels = model.preprocess([image]).to(self.device.device)
                scene_code = model.encode(pixels)[0]
        ctx.check_cancelled()

        def density(points: torch.Tensor) -> torch.Tensor:
            return model.query_density(scene_code, points)

        def color(points: torch.Tensor) -> torch.Tensor:
            return model.query(scene_code, points)[1]

        def on_chunk(done: int, total: int) -> None:
            # report() raises Cancelled once the client has gone: the next chunk never runs.
            fraction = _ENCODE_DONE + (_EXTRACT_DONE - _ENCODE_DONE) * done / total
            ctx.report(ProgressUpdate(Stage.EXTRACT, done, total, fraction))

        with ctx.phase("extract"), torch.inference_mode(), _empty_surface_is_a_bad_threshold():
            mesh = extract_mesh(
                density,
                None if request.bake_texture else color,
                resolution=request.mc_resolution,
                threshold=request.mc_threshold,
                radius=model.radius,
                chunk_size=self.settings.chunk_size,
                device=self.device.device,
                on_chunk=on_chunk,
                slab_density=lambda start, stop: model.grid_density(scene_code, request.mc_resolution, start, stop),
            )
        if not request.bake_texture:
            return MeshOutput(
                background_removed=removed, mesh=mesh, vertex_count=mesh.vertex_count, face_count=mesh.face_count
            )
        with ctx.phase("bake"), torch.inference_mode():
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

    def _colors_at(self, color: Any, positions: np.ndarray) -> np.ndarray:
        """Triplane colours at texel positions, in chunks so large textures stay bounded."""
        out = np.empty((len(positions), 3), dtype=np.float32)
        step = self.settings.chunk_size
        for start in range(0, len(positions), step):
            points = torch.from_numpy(positions[start : start + step]).to(self.device.device, self.dtype)
            out[start : start + step] = color(points).float().cpu().numpy()
        return out

"""Mesh providers, chosen by `KILN_MESH__PROVIDER` through this registry."""

from __future__ import annotations

from collections.abc import Callable

from kiln_mesh.config import MeshSettings
from kiln_mesh.providers.base import MeshModel
from kiln_mesh.providers.fake import FakeMeshProvider
from kiln_runtime.device import DeviceChoice
from kiln_runtime.model_source import offline_requested


def _local(settings: MeshSettings, device: DeviceChoice) -> MeshModel:
    # Imported here so that servers with other providers never import torch, rembg and friends.
    from kiln_mesh.providers.triposr_local import TripoSRMeshProvider

    section = settings.mesh
    return TripoSRMeshProvider(section.model, section.triposr, device, offline=offline_requested(settings.offline))


def _stable_fast_3d(settings: MeshSettings, device: DeviceChoice) -> MeshModel:
    # Imported here, as img2img's vendor provider is, so that other servers never load it.
    from kiln_mesh.providers.stable_fast_3d import StableFast3DProvider

    return StableFast3DProvider(settings.mesh.stable_fast_3d)


PROVIDERS: dict[str, Callable[[MeshSettings, DeviceChoice], MeshModel]] = {
    "local": _local,
    "stable_fast_3d": _stable_fast_3d,
    # The fake runs no model, so it ignores the device choice.
    "fake": lambda settings, device: FakeMeshProvider(settings.mesh.fake),
}


# Providers that run a model here and so need the device policy applied at startup.
RUNS_LOCALLY = frozenset({"local"})


def create_provider(settings: MeshSettings, device: DeviceChoice) -> MeshModel:
    return PROVIDERS[settings.mesh.provider](settings, device)

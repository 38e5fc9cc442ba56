"""Mesh providers, chosen by `KILN_MESH__PROVIDER` through this registry."""

from __future__ import annotations

from collections.abc import Callable

from kiln_mesh.config import MeshProviderSettings
from kiln_mesh.providers.base import MeshModel
from kiln_mesh.providers.fake import FakeMeshProvider
from kiln_runtime.device import DeviceChoice

PROVIDERS: dict[str, Callable[[MeshProviderSettings, DeviceChoice], MeshModel]] = {
    # The fake runs no model, so it ignores the device choice.
    "fake": lambda settings, device: FakeMeshProvider(settings.fake),
}


# Providers that run a model here and so need the device policy applied at startup.
RUNS_LOCALLY: frozenset[str] = frozenset()


def create_provider(settings: MeshProviderSettings, device: DeviceChoice) -> MeshModel:
    return PROVIDERS[settings.provider](settings, device)

"""Mesh providers, chosen by `KILN_MESH__PROVIDER` through this registry."""

from __future__ import annotations

from collections.abc import Callable

from kiln_mesh.config import MeshProviderSettings
from kiln_mesh.providers.base import MeshModel
from kiln_mesh.providers.fake import FakeMeshProvider

PROVIDERS: dict[str, Callable[[MeshProviderSettings], MeshModel]] = {
    "fake": lambda settings: FakeMeshProvider(settings.fake),
}


def create_provider(settings: MeshProviderSettings) -> MeshModel:
    return PROVIDERS[settings.provider](settings)

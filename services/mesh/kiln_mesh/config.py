"""Settings of the mesh server: the shared sections plus `KILN_MESH__...`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln_runtime.settings import FakeProviderSettings, KilnSettings, ModelSettings, ServerSettings, ServiceSettings


class MeshProviderSettings(ServiceSettings):
    """Which provider serves image-to-mesh and its options."""

    provider: Literal["fake"] = Field("fake", description="Provider kind: fake (no model; more come with models).")
    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings(id="stabilityai/TripoSR"),
        description="The weights a local provider loads.",
    )
    fake: FakeProviderSettings = Field(default_factory=FakeProviderSettings, description="Fake provider options.")


class MeshSettings(KilnSettings):
    """Root settings of the mesh server process."""

    mesh: MeshProviderSettings = Field(
        default_factory=lambda: MeshProviderSettings(server=ServerSettings(port=50052, metrics_port=9092)),
        description="The mesh server.",
    )

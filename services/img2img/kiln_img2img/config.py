"""Settings of the img2img server: the shared sections plus `KILN_IMG2IMG__...`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln_runtime.settings import FakeProviderSettings, KilnSettings, ModelSettings, ServerSettings, ServiceSettings


class Img2ImgProviderSettings(ServiceSettings):
    """Which provider serves img2img and its options."""

    provider: Literal["fake"] = Field("fake", description="Provider kind: fake (no model; more come with models).")
    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings(id="stable-diffusion-v1-5/stable-diffusion-v1-5"),
        description="The weights a local provider loads.",
    )
    fake: FakeProviderSettings = Field(default_factory=FakeProviderSettings, description="Fake provider options.")


class Img2ImgSettings(KilnSettings):
    """Root settings of the img2img server process."""

    img2img: Img2ImgProviderSettings = Field(
        default_factory=lambda: Img2ImgProviderSettings(server=ServerSettings(port=50051, metrics_port=9091)),
        description="The img2img server.",
    )

"""Settings of the mesh server: the shared sections plus `KILN_MESH__...`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, SecretStr, model_validator

from kiln_runtime.profiles import apply_laptop_profile
from kiln_runtime.settings import FakeProviderSettings, KilnSettings, ModelSettings, ServerSettings, ServiceSettings

DEFAULT_MODEL = "stabilityai/TripoSR"


class TripoSRSettings(BaseModel):
    """Options of the local TripoSR provider."""

    chunk_size: PositiveInt = Field(
        65536, description="Grid points per density query; bounds memory at resolutions 256-512."
    )
    rembg_model: str = Field("u2net", description="rembg session name used to remove backgrounds.")
    rembg_model_path: Path | None = Field(
        None, description="A u2net-compatible ONNX file to use instead of rembg's home (offline installs, tests)."
    )
    rembg_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description=(
            "Where rembg runs: auto = CUDA when the model runs on CUDA and the installed onnxruntime has the "
            "CUDA provider (onnxruntime-gpu), else the CPU; cuda without that provider is a load error."
        ),
    )
    autocast: Literal["auto", "off", "float16", "bfloat16"] = Field(
        "auto",
        description=(
            "Run encode, grid and colour queries under torch.autocast in this dtype with float32 weights; off keeps "
            "the device policy's weight dtype; auto = float16 on CUDA, off elsewhere."
        ),
    )
    resident_path: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Keep the density volume, marching cubes, merging and colours on the model's device and copy only "
            "the finished mesh to the host; auto = on for CUDA only (on elsewhere is for tests)."
        ),
    )
    device_slab_points: PositiveInt = Field(
        4_194_304,
        description="Grid points per density slab and vertices per colour call on the resident path (64 rows at 256).",
    )
    warmup_resolution: int = Field(
        32, ge=2, le=512, description="Grid resolution of the warm-up's one full mesh run (image to coloured mesh)."
    )


class StableFast3DSettings(BaseModel):
    """Options of the Stability AI Stable Fast 3D vendor provider."""

    api_key: SecretStr = Field(SecretStr(""), description="Stability API key (sent as a bearer token; never logged).")
    base_url: str = Field("https://api.stability.ai", description="API root; tests point it at a stand-in.")
    timeout_s: PositiveFloat = Field(120.0, description="Timeout of one HTTP call, in seconds.")


class MeshServerSettings(ServerSettings):
    """`ServerSettings` with the mesh server's own default ports.

    Defaults on the class, not a factory on the field: any KILN_MESH__... (or
    KILN_MESH__SERVER__...) variable builds its section from scratch, which would drop a default
    given higher up, and the mesh server then took img2img's 50051.
    """

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    metrics_port: int = Field(
        9092, ge=0, le=65535, description="Prometheus metrics port on the same host; 0 picks one."
    )


class MeshProviderSettings(ServiceSettings):
    """Which provider serves image-to-mesh and its options."""

    provider: Literal["fake", "local", "stable_fast_3d"] = Field(
        "local", description="local: TripoSR here; stable_fast_3d: the Stability vendor API; fake: no model."
    )
    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings(id=DEFAULT_MODEL),
        description="The TripoSR weights (config.yaml + model.ckpt) the local provider loads.",
    )
    triposr: TripoSRSettings = Field(default_factory=TripoSRSettings, description="Local provider options.")
    stable_fast_3d: StableFast3DSettings = Field(
        default_factory=StableFast3DSettings, description="Stable Fast 3D provider options."
    )
    fake: FakeProviderSettings = Field(default_factory=FakeProviderSettings, description="Fake provider options.")
    server: MeshServerSettings = Field(default_factory=MeshServerSettings, description="Listening and message caps.")


class MeshSettings(KilnSettings):
    """Root settings of the mesh server process."""

    mesh: MeshProviderSettings = Field(
        default_factory=MeshProviderSettings,
        description="The mesh server.",
    )

    @model_validator(mode="after")
    def _apply_profile(self) -> MeshSettings:
        if self.profile == "laptop":
            apply_laptop_profile(self.mesh)
        return self

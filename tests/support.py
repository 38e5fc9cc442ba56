"""Helpers shared by the test suites: settings for servers on free loopback ports, images."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln_img2img.config import DiffusersSettings, GeminiSettings, Img2ImgProviderSettings, Img2ImgSettings
from kiln_mesh.config import (
    MeshProviderSettings,
    MeshServerSettings,
    MeshSettings,
    StableFast3DSettings,
    TripoSRSettings,
)
from kiln_runtime.settings import (
    FakeProviderSettings,
    JobsSettings,
    ModelSettings,
    RuntimeSettings,
    ServerSettings,
    StorageSettings,
)


def png_bytes(size: tuple[int, int] = (96, 64), mode: str = "RGB", color: Any = (200, 100, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def img2img_request(**fields: Any) -> img2img.GenerateRequest:
    """A small valid img2img request; `fields` override or add to it."""
    base: dict[str, Any] = {
        "image": png_bytes(),
        "prompt": "a red fox in snow",
        "seed": 7,
        "scheduler": img2img.SCHEDULER_EULER,
        "output_format": img2img.IMAGE_FORMAT_PNG,
    }
    return img2img.GenerateRequest(**{**base, **fields})


def _server(kind: type[ServerSettings] = ServerSettings, **server: Any) -> ServerSettings:
    return kind(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "shutdown_grace_s": 5.0, **server})


def img2img_settings(
    data_dir: Path,
    *,
    provider: str = "fake",
    model: dict[str, Any] | None = None,
    diffusers: dict[str, Any] | None = None,
    gemini: dict[str, Any] | None = None,
    fake: dict[str, Any] | None = None,
    runtime: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    jobs: dict[str, Any] | None = None,
    offline: bool = True,
) -> Img2ImgSettings:
    section = Img2ImgProviderSettings(
        provider=provider,  # type: ignore[arg-type]
        model=ModelSettings(**(model or {"id": "unused"})),
        diffusers=DiffusersSettings(**(diffusers or {})),
        gemini=GeminiSettings(**(gemini or {})),
        server=_server(**(server or {})),
        runtime=RuntimeSettings(**(runtime or {})),
        jobs=JobsSettings(**(jobs or {})),
        fake=FakeProviderSettings(**{"step_delay_s": 0.0, **(fake or {})}),
    )
    return Img2ImgSettings(
        _env_file=None,  # type: ignore[call-arg]
        offline=offline,
        storage=StorageSettings(data_dir=data_dir, **(storage or {})),
        img2img=section,
    )


def mesh_settings(
    data_dir: Path,
    *,
    provider: str = "fake",
    model: dict[str, Any] | None = None,
    triposr: dict[str, Any] | None = None,
    stable_fast_3d: dict[str, Any] | None = None,
    fake: dict[str, Any] | None = None,
    runtime: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    jobs: dict[str, Any] | None = None,
    offline: bool = True,
) -> MeshSettings:
    section = MeshProviderSettings(
        provider=provider,  # type: ignore[arg-type]
        model=ModelSettings(**(model or {"id": "unused"})),
        triposr=TripoSRSettings(**(triposr or {})),
        stable_fast_3d=StableFast3DSettings(**(stable_fast_3d or {})),
        server=_server(MeshServerSettings, **(server or {})),
        runtime=RuntimeSettings(**(runtime or {})),
        jobs=JobsSettings(**(jobs or {})),
        fake=FakeProviderSettings(**{"step_delay_s": 0.0, **(fake or {})}),
    )
    return MeshSettings(
        _env_file=None,  # type: ignore[call-arg]
        offline=offline,
        storage=StorageSettings(data_dir=data_dir, **(storage or {})),
        mesh=section,
    )

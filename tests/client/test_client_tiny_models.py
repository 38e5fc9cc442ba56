"""The clients against servers running the real model code on the tiny test models."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import trimesh
from PIL import Image

from kiln_client import AsyncImg2ImgClient, AsyncMeshClient
from kiln_img2img.testing.tiny_models import default_root, ensure_tiny_models
from kiln_mesh.testing.assets import ensure_tiny_mesh_models
from tests.mesh.test_triposr_server import object_png
from tests.servers import StartServer
from tests.support import png_bytes


async def test_img2img_on_the_tiny_model_with_previews(start_server: StartServer, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    tiny = ensure_tiny_models(default_root())
    server, _ = await start_server(provider="local", model={"id": str(tiny.diffusers_dir)})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=120) as client:
        events = [
            e
            async for e in client.generate(
                png_bytes((128, 128)), prompt="a fox", steps=4, strength=1.0, preview_every=2
            )
        ]
        result = await client.generate_image(
            png_bytes((128, 128)), prompt="a fox", steps=4, seed=1, delivery="REFERENCE"
        )
        path = await client.download(result.artifact, tmp_path / "fox.png")
    previews = [e for e in events if e.WhichOneof("event") == "progress" and e.progress.HasField("preview")]
    assert len(previews) == 2
    assert Image.open(io.BytesIO(previews[0].progress.preview.data)).format == "WEBP"
    with Image.open(path) as image:
        assert image.size == (result.width, result.height) == (128, 128)
    assert result.result.provenance.provider == "local"


async def test_mesh_on_the_tiny_triposr(start_server: StartServer, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    tiny = ensure_tiny_mesh_models()
    server, _ = await start_server(
        "mesh",
        provider="local",
        model={"id": str(tiny.triposr_dir)},
        triposr={"rembg_model_path": tiny.u2net_path},
    )
    async with AsyncMeshClient(f"127.0.0.1:{server.port}", timeout=120) as client:
        result = await client.generate_mesh(object_png(), mc_resolution=32, delivery="CHUNKED")
        path = await client.download(result.artifact, tmp_path / "object.glb")
    mesh = trimesh.load(path, force="mesh", process=False)
    assert len(mesh.vertices) == result.vertex_count > 0
    assert len(mesh.faces) == result.face_count > 0

"""Artifact download to a file from every source: inline, chunks, file://, GetArtifact, http(s)://."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln_client import AsyncImg2ImgClient, ChecksumError, Img2ImgClient, MeshClient
from tests.servers import StartServer
from tests.support import png_bytes


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server over a folder, standing in for a public artifact URL (a bucket, the gateway)."""
    root = tmp_path / "public"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("delivery", ["INLINE", "CHUNKED", "REFERENCE"])
async def test_each_delivery_downloads_a_verified_file(
    start_server: StartServer, tmp_path: Path, delivery: str
) -> None:
    server, _ = await start_server("img2img", fake={"output_bytes": 300_000}, server={"max_message_bytes": 128 * 1024})
    destination = tmp_path / f"{delivery}.png"
    with Img2ImgClient(f"127.0.0.1:{server.port}", timeout=30, max_message_bytes=128 * 1024) as client:
        result = await asyncio.to_thread(client.generate_image, png_bytes(), prompt="x", delivery=delivery)
        written = await asyncio.to_thread(client.download, result.artifact, destination)
    assert (result.image is None) == (delivery == "REFERENCE")
    assert written == destination
    assert _sha256(destination) == result.artifact.sha256
    assert destination.stat().st_size == result.artifact.size_bytes
    assert list(tmp_path.glob(".*.part")) == []


async def test_reference_with_an_unreachable_uri_downloads_through_get_artifact(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The URI points nowhere this test can reach, so the bytes must come over the channel.
    server, _ = await start_server("mesh", storage={"public_base_url": "http://127.0.0.1:1/artifacts"})
    with MeshClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        result = await asyncio.to_thread(client.generate_mesh, png_bytes(), delivery="REFERENCE")
        path = await asyncio.to_thread(client.download, result.artifact, tmp_path / "mesh.glb")
    assert result.data is None and result.uri.startswith("http://127.0.0.1:1/")
    assert _sha256(path) == result.artifact.sha256


async def test_artifact_of_another_server_is_fetched_from_its_public_uri(
    start_server: StartServer, tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    # Mesh writes to its own storage, published over HTTP; a client connected to img2img gets
    # NOT_FOUND from GetArtifact there and falls back to the public URI.
    public_dir, base_url = http_root
    mesh_server, _ = await start_server("mesh", storage={"public_base_url": base_url})
    img2img_server, _ = await start_server("img2img")
    with MeshClient(f"127.0.0.1:{mesh_server.port}", timeout=30) as mesh:
        result = await asyncio.to_thread(mesh.generate_mesh, png_bytes(), delivery="REFERENCE")
    job_dir = mesh_server.runtime.store.root / result.artifact.id.split("/")[0]
    (public_dir / job_dir.name).symlink_to(job_dir, target_is_directory=True)
    with Img2ImgClient(f"127.0.0.1:{img2img_server.port}", timeout=30) as other:
        path = await asyncio.to_thread(other.download, result.artifact, tmp_path / "elsewhere.glb")
    assert _sha256(path) == result.artifact.sha256


async def test_tampered_artifact_raises_and_leaves_no_file(start_server: StartServer, tmp_path: Path) -> None:
    server, _ = await start_server("img2img", storage={"public_base_url": "http://127.0.0.1:1/artifacts"})
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    destination = downloads / "out.png"
    with Img2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        result = await asyncio.to_thread(client.generate_image, png_bytes(), prompt="x", delivery="REFERENCE")
        stored = server.runtime.store.root / result.artifact.id
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF  # same size, different bytes
        stored.write_bytes(bytes(data))
        with pytest.raises(ChecksumError):
            await asyncio.to_thread(client.download, result.artifact, destination)
    assert list(downloads.iterdir()) == []


async def test_async_client_downloads_by_reference(start_server: StartServer, tmp_path: Path) -> None:
    server, _ = await start_server("img2img", storage={"public_base_url": "http://127.0.0.1:1/artifacts"})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        result = await client.generate_image(png_bytes(), prompt="x", delivery="REFERENCE")
        path = await client.download(result.artifact, tmp_path / "async.png")
    assert _sha256(path) == result.artifact.sha256

"""Artifact downloads (`GET /v1/artifacts/...`, the ArtifactProvider RPC) and the page at `/`, through Envoy."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from gateway.kiln_gateway import Envoy
from kiln.artifacts.v1 import artifact_service_pb2 as artifacts
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import channel_to, envoy_for, img2img_json, img2img_request, kiln_server

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KilnServer]:
    root: Path = tmp_path_factory.mktemp("artifacts")
    async with kiln_server("img2img", root / "img2img", fake={"steps": 1}) as img2img_server:
        yield img2img_server


@pytest.fixture(scope="module")
def envoy(server: KilnServer) -> Iterator[Envoy]:
    with envoy_for([server.port], [server.port]) as running:
        yield running


async def stored_artifact(server: KilnServer) -> tuple[str, str, int, str]:
    async with channel_to(server.port) as channel:
        events = [e async for e in img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())]
    artifact = events[-1].result.artifacts[0]
    return artifact.id, artifact.media_type, artifact.size_bytes, artifact.sha256


async def test_download_through_the_gateway(server: KilnServer, envoy: Envoy) -> None:
    artifact_id, media_type, size, sha256 = await stored_artifact(server)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=30) as client:
        response = await client.get(f"/v1/artifacts/{artifact_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert int(response.headers["content-length"]) == size
    assert hashlib.sha256(response.content).hexdigest() == sha256


async def test_grpc_get_artifact_through_the_gateway(server: KilnServer, envoy: Envoy) -> None:
    artifact_id, media_type, _, sha256 = await stored_artifact(server)
    async with channel_to(envoy.port) as channel:
        body = await artifacts_grpc.ArtifactProviderStub(channel).GetArtifact(
            artifacts.GetArtifactRequest(artifact_id=artifact_id)
        )
    assert body.content_type == media_type
    assert hashlib.sha256(body.data).hexdigest() == sha256


@pytest.mark.parametrize(
    ("path", "status", "needle"),
    [
        ("/v1/artifacts/01M8BRC3EP29HK3C17SXJ4WSHZ/nothing.png", 404, "no artifact"),
        ("/v1/artifacts/not-a-job-id/x.png", 400, "artifact_id"),
        # An escaped slash never reaches a server: the gateway refuses it (hardening).
        ("/v1/artifacts/01M8BRC3EP29HK3C17SXJ4WSHZ/%2e%2e%2fsecret", 400, "encoded slash"),
    ],
)
async def test_download_errors_are_json(envoy: Envoy, path: str, status: int, needle: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=30) as client:
        response = await client.get(path)
    assert response.status_code == status
    assert needle in response.text


async def test_grpc_not_found(server: KilnServer) -> None:
    async with channel_to(server.port) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await artifacts_grpc.ArtifactProviderStub(channel).GetArtifact(
                artifacts.GetArtifactRequest(artifact_id="01M8BRC3EP29HK3C17SXJ4WSHZ/none.png")
            )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_page_at_root(envoy: Envoy) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=30) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>Kiln</h1>" in response.text


async def test_page_files_are_gzipped_and_streams_are_not(server: KilnServer, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><h1>Kiln</h1>" + "<p>kiln</p>" * 500)
    (tmp_path / "app.js").write_text("console.log('kiln');\n" * 500)
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 20)
    with envoy_for([server.port], [server.port], web_root=tmp_path) as gateway:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", timeout=30) as client:
            gzip_only = {"accept-encoding": "gzip"}
            page, script, binary = [await client.get(p, headers=gzip_only) for p in ("/", "/app.js", "/model.bin")]
            plain = await client.get("/app.js", headers={"accept-encoding": "identity"})
            events = await client.post("/v1/img2img:generate", json=img2img_json(), headers=gzip_only)
    assert page.headers["content-encoding"] == "gzip" and "<h1>Kiln</h1>" in page.text
    assert script.headers["content-encoding"] == "gzip"
    assert script.num_bytes_downloaded < len(script.content) / 5  # compressed on the wire
    assert script.content == plain.content and "content-encoding" not in plain.headers
    assert "content-encoding" not in binary.headers  # not a text type
    # A server stream must reach the client event by event: never compressed.
    assert events.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in events.headers
    assert '"result"' in events.text

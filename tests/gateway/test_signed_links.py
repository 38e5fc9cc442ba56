"""Signed artifact links through a real Envoy: a result's URI downloads with no credentials at all,
until it expires; an altered one is 403; nothing the servers answer names a server folder.

Every server here shares one artifact folder and one signing key, as replicas behind one gateway
must. The jobs are submitted as `alice` (the principal header, as an authenticating gateway would
set it), so a download without any header proves the link, not the caller, let it through.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.kiln_gateway import Envoy, GatewaySettings
from kiln.common.v1 import artifact_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.principal import PRINCIPAL_HEADER
from kiln_runtime.server import KilnServer
from kiln_runtime.signing import EXPIRED_MESSAGE, MISMATCH_MESSAGE
from tests.gateway.auth_support import write_keys_file
from tests.gateway.conftest import channel_to, img2img_request, kiln_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

SIGNING_KEY = "kiln-test-link-key-5b2e9d"
API_KEY = "kiln-test-links-alice-3c71f0"
ALICE = ((PRINCIPAL_HEADER, "alice"),)


@dataclass
class Stack:
    root: Path
    server: KilnServer  # behind both gateways; serves every download
    short: KilnServer  # makes links that live one second
    keyed: KilnServer  # makes links naming the api_key gateway
    envoy: Envoy  # auth.mode none
    keyed_envoy: Envoy  # auth.mode api_key

    def base_url(self, envoy: Envoy) -> str:
        return f"http://127.0.0.1:{envoy.port}/v1/artifacts"


def free_port() -> int:
    """A loopback port nothing listens on now: the gateway's, known before the servers start.

    The servers must be told the gateway's address (their links name it) before Envoy can be
    told theirs; the port is taken again by Envoy a moment later.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def gateway(port: int, upstream: int, **settings: Any) -> AsyncIterator[Envoy]:
    """Envoy on `port` in front of one img2img server (which serves the artifacts too)."""
    envoy = Envoy(
        GatewaySettings(
            _env_file=None,  # type: ignore[call-arg]
            port=port,
            admin_port=0,
            img2img_upstreams=[f"127.0.0.1:{upstream}"],
            mesh_upstreams=[f"127.0.0.1:{upstream}"],
            **settings,
        )
    )
    await asyncio.to_thread(envoy.start)  # in a thread: the in-process servers answer its health checks
    try:
        yield envoy
    finally:
        await asyncio.to_thread(envoy.stop)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root: Path = tmp_path_factory.mktemp("signed-links")
    open_port, keyed_port = free_port(), free_port()
    shared = {"output_dir": root / "outputs", "url_signing_key": SIGNING_KEY}
    open_base = f"http://127.0.0.1:{open_port}/v1/artifacts"
    keys_file = write_keys_file(root / "api-keys", [f"alice {API_KEY}"])
    fake = {"steps": 1, "step_delay_s": 0.0}
    async with (
        kiln_server("img2img", root / "server", fake=fake, storage={**shared, "public_base_url": open_base}) as server,
        kiln_server(
            "img2img", root / "short", fake=fake, storage={**shared, "public_base_url": open_base, "url_expiry_s": 1}
        ) as short,
        kiln_server(
            "img2img",
            root / "keyed",
            fake=fake,
            storage={**shared, "public_base_url": f"http://127.0.0.1:{keyed_port}/v1/artifacts"},
        ) as keyed,
        gateway(open_port, server.port) as envoy,
        gateway(keyed_port, server.port, auth={"mode": "api_key", "api_keys_file": keys_file}) as keyed_envoy,
    ):
        yield Stack(root, server, short, keyed, envoy, keyed_envoy)


async def alices_artifact(server: KilnServer) -> artifact_pb2.Artifact:
    """Run a job as alice straight on `server`; its one artifact (bytes inline, to compare)."""
    async with channel_to(server.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        events = [event async for event in stub.Generate(img2img_request(), metadata=ALICE)]
    (artifact,) = events[-1].result.artifacts
    assert artifact.inline_data
    return artifact


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET with plain urllib (no credentials unless given): status and body, errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def with_query(url: str, **changes: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    query = {**dict(urllib.parse.parse_qsl(parsed.query)), **changes}
    return urllib.parse.urlunsplit(parsed._replace(query=urllib.parse.urlencode(query)))


def unsigned(url: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(query=""))


async def test_a_result_link_downloads_without_credentials(stack: Stack) -> None:
    artifact = await alices_artifact(stack.server)
    assert artifact.uri.startswith(f"{stack.base_url(stack.envoy)}/{artifact.id}?expires=")
    status, body = await asyncio.to_thread(fetch, artifact.uri)
    assert status == 200 and hashlib.sha256(body).hexdigest() == artifact.sha256
    # Without the signature the caller is anonymous, and the artifact is alice's: no such artifact.
    status, body = await asyncio.to_thread(fetch, unsigned(artifact.uri))
    assert status == 404 and b"no artifact" in body
    # A replay of the job hands out a fresh link (the one in the record may have expired).
    async with channel_to(stack.server.port) as channel:
        job_id = artifact.id.split("/")[0]
        job = (
            await img2img_grpc.Img2ImgProviderStub(channel).GetJob(img2img.GetJobRequest(job_id=job_id), metadata=ALICE)
        ).job
    fresh = job.result.artifacts[0].uri
    assert fresh.startswith(f"{stack.base_url(stack.envoy)}/{artifact.id}?expires=")
    status, body = await asyncio.to_thread(fetch, fresh)
    assert status == 200 and hashlib.sha256(body).hexdigest() == artifact.sha256


@pytest.mark.parametrize("part", ["signature", "expires", "artifact"])
async def test_an_altered_link_is_403(stack: Stack, part: str) -> None:
    artifact = await alices_artifact(stack.server)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(artifact.uri).query))
    if part == "signature":
        flipped = "0" if query["signature"][-1] != "0" else "1"
        altered = with_query(artifact.uri, signature=query["signature"][:-1] + flipped)
    elif part == "expires":
        altered = with_query(artifact.uri, expires=str(int(query["expires"]) + 86400))
    else:  # one artifact's link used for another file of the same job
        name = artifact.id.split("/")[1]
        altered = artifact.uri.replace(f"/{name}?", f"/other-{name}?")
    status, body = await asyncio.to_thread(fetch, altered)
    assert status == 403, body
    assert MISMATCH_MESSAGE.encode() in body


async def test_an_expired_link_is_403(stack: Stack) -> None:
    artifact = await alices_artifact(stack.short)
    expires = int(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(artifact.uri).query))["expires"])
    # Polled (not slept) until the link has expired, then asked again: refused, saying what to do.
    async with asyncio.timeout(15):
        while True:
            status, body = await asyncio.to_thread(fetch, artifact.uri)
            if status != 200:
                break
            await asyncio.sleep(0.1)
    assert status == 403, body
    assert EXPIRED_MESSAGE.encode() in body
    assert json.loads(body)["code"] == 7  # PERMISSION_DENIED, in the transcoded JSON error
    assert time.time() >= expires


async def test_no_server_folder_in_info_or_results(stack: Stack) -> None:
    folder = str(stack.root)
    async with channel_to(stack.envoy.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        info = await stub.GetInfo(img2img.GetInfoRequest())
        events = [event async for event in stub.Generate(img2img_request())]
    status, body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{stack.envoy.port}/v1/img2img/info")
    assert status == 200
    texts = [body.decode(), str(info), str(events[-1].result)]
    for text in texts:
        assert folder not in text and str(Path(folder).resolve()) not in text and "file://" not in text
    assert "/" not in info.model.model_id or info.model.model_id.count("/") == 1  # a hub id or a name


async def test_with_api_keys_the_link_still_needs_none(stack: Stack) -> None:
    artifact = await alices_artifact(stack.keyed)
    assert artifact.uri.startswith(stack.base_url(stack.keyed_envoy))
    status, body = await asyncio.to_thread(fetch, artifact.uri)
    assert status == 200 and hashlib.sha256(body).hexdigest() == artifact.sha256
    status, _ = await asyncio.to_thread(fetch, unsigned(artifact.uri))
    assert status == 401, "without a signature the route wants a key"
    status, body = await asyncio.to_thread(fetch, unsigned(artifact.uri), {"authorization": f"Bearer {API_KEY}"})
    assert status == 200 and hashlib.sha256(body).hexdigest() == artifact.sha256, "alice's key: her artifact"

"""grpcurl through Envoy: reflection is not routed there, so it uses the generated descriptor set."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.kiln_gateway import Envoy
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import envoy_for, kiln_server
from tests.grpc.test_grpcurl import json_stream
from tests.support import png_bytes
from tests.tools import grpcurl_executable

pytestmark = pytest.mark.asyncio(loop_scope="module")
DESCRIPTOR = Path(__file__).resolve().parents[2] / "gateway" / "kiln.binpb"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KilnServer]:
    async with kiln_server("img2img", tmp_path_factory.mktemp("grpcurl") / "img2img", fake={"steps": 2}) as running:
        yield running


@pytest.fixture(scope="module")
def envoy(server: KilnServer) -> Iterator[Envoy]:
    with envoy_for([server.port], [server.port]) as running:
        yield running


async def run_grpcurl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        grpcurl_executable(), "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def test_reflection_is_not_routed_through_the_gateway(envoy: Envoy) -> None:
    code, _, stderr = await run_grpcurl(f"127.0.0.1:{envoy.port}", "list")
    assert code != 0 and "reflection" in stderr


async def test_grpcurl_with_protoset_through_the_gateway(envoy: Envoy) -> None:
    target = f"127.0.0.1:{envoy.port}"
    code, listing, stderr = await run_grpcurl("-protoset", str(DESCRIPTOR), target, "list")
    assert code == 0, stderr
    assert {"kiln.img2img.v1.Img2ImgProvider", "kiln.mesh.v1.MeshProvider"} <= set(listing.split())
    body = {
        "image": base64.b64encode(png_bytes()).decode(),
        "prompt": "through envoy",
        "seed": 3,
        "scheduler": "SCHEDULER_EULER",
        "output_format": "IMAGE_FORMAT_PNG",
    }
    method = "kiln.img2img.v1.Img2ImgProvider/Generate"
    code, out, stderr = await run_grpcurl("-protoset", str(DESCRIPTOR), "-d", json.dumps(body), target, method)
    assert code == 0, stderr
    events = json_stream(out)
    assert next(iter(events[0])) == "accepted" and next(iter(events[-1])) == "result"
    assert events[-1]["result"]["parameters"]["seed"] == 3

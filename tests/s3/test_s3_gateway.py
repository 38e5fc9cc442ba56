"""The gateway's artifact route over the S3 backend: the server streams from the bucket."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path

from kiln_runtime.storage import new_job_id
from tests.gateway.conftest import envoy_for, kiln_server
from tests.s3.conftest import BUCKET
from tests.s3.seaweed import SeaweedFS

MiB = 1 << 20


def curl(url: str, out: Path) -> dict[str, str]:
    """GET `url` into `out` with curl; returns the response headers (lower-case names)."""
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-D", "-", "-o", str(out), url], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split(":", 1) for line in result.stdout.splitlines() if ":" in line]
    return {name.strip().lower(): value.strip() for name, value in lines}


async def test_the_artifact_route_reads_through_the_bucket(
    seaweed: SeaweedFS, aws_env: dict[str, str], tmp_path: Path
) -> None:
    storage = {"backend": "s3", "s3": {"endpoint_url": seaweed.endpoint, "bucket": BUCKET, "prefix": "gateway/"}}
    async with kiln_server("img2img", tmp_path / "server", storage=storage) as server:
        # Bigger than a gRPC message and than one ranged read, so it streams in many pieces.
        data = os.urandom(20 * MiB + 11)
        stored = await asyncio.to_thread(
            server.runtime.store.put, new_job_id(), "mesh.glb", data, media_type="model/gltf-binary"
        )
        # curl in a thread: the server answers on this test's event loop.
        with envoy_for([server.port]) as envoy:
            route = f"http://127.0.0.1:{envoy.port}/v1/artifacts/{stored.id}"
            via_gateway = await asyncio.to_thread(curl, route, tmp_path / "gateway.glb")
        straight = await asyncio.to_thread(curl, stored.uri, tmp_path / "presigned.glb")
    for headers, name in ((via_gateway, "gateway.glb"), (straight, "presigned.glb")):
        assert headers["content-type"] == "model/gltf-binary"
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == stored.sha256
    assert via_gateway["content-length"] == str(len(data))
    # Nothing went to the server's disk.
    assert not (tmp_path / "server" / "outputs").exists()

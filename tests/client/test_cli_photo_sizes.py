"""`kiln img2img` with photo-sized files through a real Envoy: a 10 MiB JPEG works, 25 MiB is named.

Before the caps followed `limits.max_image_bytes`, the client refused anything over 4 MiB with
"resource exhausted: CLIENT: Sent message larger than max".
"""

from __future__ import annotations

from pathlib import Path

from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES
from tests.client.test_cli import kiln
from tests.gateway.conftest import envoy_running, requests_total
from tests.photos import MiB, photo_jpeg
from tests.servers import StartServer

INVALID_ARGUMENT_EXIT = 10 + 3  # 10 + the gRPC code, as the command documents


async def test_kiln_img2img_with_a_10_mib_photo_through_the_gateway(start_server: StartServer, tmp_path: Path) -> None:
    server, _ = await start_server("img2img", fake={"steps": 2})
    (tmp_path / "photo.jpg").write_bytes(photo_jpeg(10 * MiB))
    async with envoy_running([server.port]) as envoy:
        run = await kiln(
            "img2img", "photo.jpg", "-p", "a fox", "--target", f"127.0.0.1:{envoy.port}", "-o", "out.png", cwd=tmp_path
        )
    assert run.code == 0, run.stderr
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")


async def test_kiln_img2img_with_a_25_mib_photo_names_the_image_and_the_limit(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, _ = await start_server("img2img", fake={"steps": 2})
    (tmp_path / "photo.jpg").write_bytes(photo_jpeg(25 * MiB))
    before = requests_total(server)
    async with envoy_running([server.port]) as envoy:
        run = await kiln("img2img", "photo.jpg", "-p", "a fox", "--target", f"127.0.0.1:{envoy.port}", cwd=tmp_path)
    assert run.code == INVALID_ARGUMENT_EXIT, run.stderr
    assert f"invalid request: image: is {25 * MiB} bytes, more than the {DEFAULT_MAX_IMAGE_BYTES} allowed" in run.stderr
    assert "busy" not in run.stderr and "resource exhausted" not in run.stderr
    assert requests_total(server) - before == 1  # no retry by the command or by Envoy

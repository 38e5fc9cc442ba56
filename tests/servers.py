"""The `start_server` fixture: real grpc.aio servers on free loopback ports, built by the production
`create_server`, stopped at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from kiln_img2img.server import create_server as create_img2img_server
from kiln_mesh.server import create_server as create_mesh_server
from kiln_runtime.server import KilnServer
from tests.support import img2img_settings, mesh_settings

StartServer = Callable[..., Awaitable[tuple[KilnServer, grpc.aio.Channel]]]


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start img2img or mesh servers with the fake provider; all are stopped at teardown."""
    started: list[tuple[KilnServer, grpc.aio.Channel]] = []

    async def start(
        kind: str = "img2img", *, wait_ready: bool = True, **options: Any
    ) -> tuple[KilnServer, grpc.aio.Channel]:
        data_dir = tmp_path / f"{kind}-{len(started)}"
        if kind == "img2img":
            server = create_img2img_server(img2img_settings(data_dir, **options))
        else:
            server = create_mesh_server(mesh_settings(data_dir, **options))
        port = await server.start()
        if wait_ready:
            await server.runtime.manager.wait_loaded()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        started.append((server, channel))
        return server, channel

    yield start
    for server, channel in started:
        await channel.close()
        await server.stop(grace=0)

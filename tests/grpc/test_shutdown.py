"""Shutdown order on a real server: the provider is closed only after the last worker running it has
returned, even when that run outlives the grace period (worker threads cannot be interrupted)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health

from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_img2img import SERVICE_NAME
from kiln_img2img.providers import PROVIDERS
from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_img2img.providers.fake import FakeImg2ImgProvider
from kiln_img2img.server import create_server
from kiln_runtime.errors import ShuttingDown
from kiln_runtime.model_manager import ModelManager
from kiln_runtime.provider import RunContext
from kiln_runtime.settings import FakeProviderSettings
from kiln_runtime.telemetry.metrics import ServiceMetrics
from tests.support import img2img_request, img2img_settings


class UninterruptibleProvider(FakeImg2ImgProvider):
    """The fake model, recording its lifecycle, whose run is one long call that checks for nothing
    (like a single model step) until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(FakeProviderSettings(steps=1, step_delay_s=0.0))
        self.calls: list[str] = []
        self.running = threading.Event()
        self.let_go = threading.Event()

    def run(self, request: Img2ImgInput, ctx: RunContext) -> Img2ImgOutput:
        self.calls.append("run")
        self.running.set()
        try:
            assert self.let_go.wait(30)
            return super().run(request, ctx)  # the job is cancelled by now: this raises Cancelled
        finally:
            self.calls.append("run returned")

    def close(self) -> None:
        self.calls.append("close")


async def test_the_provider_is_closed_after_a_run_that_outlives_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    provider = UninterruptibleProvider()
    monkeypatch.setitem(PROVIDERS, "fake", lambda settings, device: provider)
    server = create_server(img2img_settings(tmp_path / "data", server={"metrics_enabled": False}))
    port = await server.start()
    stopping: asyncio.Task[None] | None = None
    try:
        await server.runtime.manager.wait_loaded()
        caplog.set_level(logging.INFO, logger="kiln_runtime.model_manager")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())
            assert await asyncio.to_thread(provider.running.wait, 10)
            stopping = asyncio.create_task(server.stop(grace=0.1))
            # The grace period ends with the run still inside the provider: stop() must wait for it.
            async with asyncio.timeout(10):
                while "before closing the model" not in caplog.text:
                    assert "close" not in provider.calls, f"closed under a running job: {provider.calls}"
                    await asyncio.sleep(0.02)
            assert provider.calls == ["run"] and not stopping.done()
            provider.let_go.set()
            await asyncio.wait_for(stopping, 10)
            call.cancel()
        assert provider.calls == ["run", "run returned", "close"]
    finally:
        provider.let_go.set()  # never leave a worker thread blocked behind a failed assertion
        if stopping is None:
            await server.stop(grace=0)
        else:
            await asyncio.wait_for(stopping, 10)


async def test_no_job_takes_the_provider_once_closing_has_begun() -> None:
    # A worker that starts between the end of the grace period and the close must not get a
    # provider that is about to be closed: it fails as a retriable shutdown instead.
    provider = UninterruptibleProvider()
    manager = ModelManager(
        provider,
        health_servicer=health.aio.HealthServicer(),
        service_names=[SERVICE_NAME],
        metrics=ServiceMetrics("img2img"),
    )
    await manager.start()
    await manager.wait_loaded()
    await manager.close()
    assert provider.calls == ["close"]
    with pytest.raises(ShuttingDown), manager.lease():
        pass

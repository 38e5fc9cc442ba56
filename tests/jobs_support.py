"""Helpers the job tests share across folders (grpc, gateway, client)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln_runtime.server import KilnServer


async def eventually(condition: Callable[[], Any], within: float = 15.0) -> None:
    """Poll `condition` (a value or an awaitable) until it is true; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while not await _value(condition()):
            await asyncio.sleep(0.05)


async def _value(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


def provider_runs(server: KilnServer) -> float:
    """Runs of the fake provider that went through all their steps.

    The fake provider times its steps as the `denoise` phase, and the server records each run's
    phases once, when the run has finished, in `kiln_phase_duration_seconds` (its Prometheus
    registry, what the metrics endpoint serves). A second run of a job would add one more.
    """
    labels = {"service": "img2img", "phase": "denoise"}
    return server.runtime.metrics.registry.get_sample_value("kiln_phase_duration_seconds_count", labels) or 0.0


def assert_consecutive(events: Iterable[img2img.GenerateResponse], after: int = 0) -> None:
    """Sequences run after+1, after+2, ... with no gap and no duplicate."""
    sequences = [event.sequence for event in events]
    assert sequences == list(range(after + 1, after + 1 + len(sequences))), sequences

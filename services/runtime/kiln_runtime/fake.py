"""The deterministic stand-in model loop shared by both services' fake providers.

It exercises the whole path (admission, progress, cancellation, failures, delivery)
without weights: a configurable number of steps with a configurable delay, progress after
each, and an injected failure at a chosen step (optionally only for prompts that contain a
marker, so one server can serve both good and failing requests in gateway tests).
"""

from __future__ import annotations

import random
import time

import numpy as np

from kiln_runtime import __version__
from kiln_runtime.errors import ProviderFailed
from kiln_runtime.provider import PreviewImage, ProgressUpdate, ProviderDescription, Reproducibility, RunContext, Stage
from kiln_runtime.settings import FakeProviderSettings


def describe_fake(model_id: str) -> ProviderDescription:
    return ProviderDescription(
        kind="fake",
        model_id=model_id,
        model_revision="fake-1",
        device="cpu",
        dtype="float32",
        library_versions={"kiln": __version__},
        reproducibility=Reproducibility.BITWISE_SAME_HARDWARE,
    )


def failing_step(settings: FakeProviderSettings, prompt: str) -> int:
    """The 1-based step at which this run fails, or 0 when it does not."""
    marker = settings.fail_when_prompt_contains
    if marker:
        return max(settings.fail_at_step, 1) if marker in prompt else 0
    return settings.fail_at_step


def run_fake_steps(
    settings: FakeProviderSettings,
    ctx: RunContext,
    stage: Stage,
    *,
    prompt: str = "",
    preview: PreviewImage | None = None,
    preview_every: int = 0,
) -> None:
    """Sleep through `settings.steps` steps, reporting progress; fail where configured."""
    fail_at = failing_step(settings, prompt)
    for step in range(1, settings.steps + 1):
        ctx.check_cancelled()
        if settings.burn_cpu:
            _burn(settings.step_delay_s)
        else:
            time.sleep(settings.step_delay_s)
        if step == fail_at:
            raise ProviderFailed(f"the fake provider failed at step {step} as configured (fail_at_step)")
        with_preview = preview if preview_every and step % preview_every == 0 else None
        ctx.report(ProgressUpdate(stage, step, settings.steps, step / settings.steps, with_preview))


def _burn(seconds: float) -> None:
    """Keep a core busy for about `seconds` with GIL-releasing matrix work, like a model step."""
    matrix = np.ones((256, 256), dtype=np.float32)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        matrix = np.tanh(matrix @ matrix / 256.0)


def fake_bytes(seed: int, size: int) -> bytes:
    """Incompressible, reproducible bytes: the same seed always gives the same content."""
    return random.Random(seed).randbytes(size)


def sleep_load(settings: FakeProviderSettings) -> None:
    time.sleep(settings.load_delay_s)

"""The Gemini img2img provider against a local stand-in speaking Gemini's REST JSON."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from PIL import Image

from kiln_img2img.config import GeminiSettings
from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_img2img.providers.gemini import GeminiImg2ImgProvider
from kiln_runtime.errors import Cancelled, KilnError, Overloaded, ProviderFailed
from kiln_runtime.provider import ProgressUpdate, Reproducibility, RunContext, Stage
from kiln_runtime.vendor_errors import (
    ContentBlockedInput,
    ContentBlockedOutput,
    NoImageProduced,
    VendorAuth,
    VendorQuota,
    VendorUnavailable,
)
from tests.standins.gemini import GeminiStandIn

KEY = "AIza-standin-SECRET-0123456789"
INPUT_COLOR = (200, 100, 50)
INVERTED = (55, 155, 205)  # the stand-in's "edit" is the colour negative of the input
PROMPT = "turn this photo into a watercolor painting"


@pytest.fixture
def gemini() -> Iterator[GeminiStandIn]:
    with GeminiStandIn(api_key=KEY) as server:
        yield server


def make_provider(gemini: GeminiStandIn, **settings: Any) -> GeminiImg2ImgProvider:
    provider = GeminiImg2ImgProvider(GeminiSettings(**{"api_key": KEY, "base_url": gemini.base_url, **settings}))
    provider.load()
    return provider


def make_request(*, prompt: str = PROMPT, negative_prompt: str = "", seed: int = 1234) -> Img2ImgInput:
    return Img2ImgInput(
        image=Image.new("RGB", (64, 48), INPUT_COLOR),
        prompt=prompt,
        negative_prompt=negative_prompt,
        strength=0.75,
        num_inference_steps=30,
        guidance_scale=7.5,
        seed=seed,
        scheduler="DPMPP_2M",
        preview_every_n_steps=0,
    )


def run(provider: GeminiImg2ImgProvider, request: Img2ImgInput | None = None) -> tuple[Img2ImgOutput, list[Stage]]:
    updates: list[ProgressUpdate] = []
    output = provider.run(request or make_request(), RunContext("job-1", updates.append))
    return output, [update.stage for update in updates]


def run_failing(provider: GeminiImg2ImgProvider, error: type[KilnError]) -> KilnError:
    with pytest.raises(error) as caught:
        run(provider)
    assert KEY not in str(caught.value) and KEY not in str(caught.value.metadata)
    return caught.value


def run_cancelled_after(provider: GeminiImg2ImgProvider, delay_s: float) -> tuple[float, list[Stage]]:
    """Run with a cancel from another thread after `delay_s`; returns seconds from cancel to raise."""
    updates: list[ProgressUpdate] = []
    ctx = RunContext("job-1", updates.append)
    cancelled_at: list[float] = []

    def cancel() -> None:
        cancelled_at.append(time.monotonic())
        ctx.cancel()

    timer = threading.Timer(delay_s, cancel)
    timer.start()
    try:
        with pytest.raises(Cancelled):
            provider.run(make_request(), ctx)
        return time.monotonic() - cancelled_at[0], [update.stage for update in updates]
    finally:
        timer.cancel()
        timer.join()


def test_success_returns_the_vendor_image_and_reports_vendor_stages(gemini: GeminiStandIn) -> None:
    output, stages = run(make_provider(gemini))

    assert output.image.mode == "RGB" and output.image.size == (64, 48)
    assert output.image.getpixel((0, 0)) == INVERTED
    assert output.steps_run == 0 and output.prompt_truncated is False
    assert stages == [Stage.VENDOR_SUBMITTED, Stage.VENDOR_WAITING, Stage.VENDOR_RECEIVED]


def test_request_carries_prompt_and_inline_png_and_the_key_only_in_its_header(gemini: GeminiStandIn) -> None:
    run(make_provider(gemini))

    [sent] = gemini.requests
    assert sent.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"  # no ?key= in the URL
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.headers["content-type"] == "application/json"
    assert KEY not in sent.raw_body.decode()
    assert sent.body is not None and sent.body["contents"][0]["role"] == "user"
    assert sent.prompt == PROMPT
    [(mime, data)] = sent.images
    assert mime == "image/png"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (64, 48) and image.getpixel((0, 0)) == INPUT_COLOR
    assert sent.body["generationConfig"] == {"responseModalities": ["TEXT", "IMAGE"], "seed": 1234}


def test_negative_prompt_becomes_an_instruction_and_a_uint32_seed_fits_int32(gemini: GeminiStandIn) -> None:
    run(make_provider(gemini), make_request(negative_prompt="blurry, text", seed=2**32 - 1))

    [sent] = gemini.requests
    assert sent.prompt == f"{PROMPT}\n\nAvoid: blurry, text"
    assert sent.body is not None and sent.body["generationConfig"]["seed"] == (2**32 - 1) % 2**31


def test_image_part_need_not_come_first(gemini: GeminiStandIn) -> None:
    gemini.scenario = "image_first"
    output, _ = run(make_provider(gemini))
    assert output.image.getpixel((0, 0)) == INVERTED


def test_wrong_key_is_vendor_auth(gemini: GeminiStandIn) -> None:
    provider = GeminiImg2ImgProvider(GeminiSettings(api_key="not-the-key", base_url=gemini.base_url))
    with pytest.raises(VendorAuth) as caught:
        run(provider)

    assert caught.value.code == grpc.StatusCode.INTERNAL and caught.value.reason == "VENDOR_AUTH"
    assert caught.value.metadata == {
        "vendor": "gemini",
        "vendor_reason": "API_KEY_INVALID",
        "http_status": "400",
        "vendor_status": "INVALID_ARGUMENT",
    }
    assert "not-the-key" not in str(caught.value)


def test_429_with_retry_delay_is_retried_after_the_delay(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.retry_delay = "quota_once", "0.5s"
    output, stages = run(make_provider(gemini))

    first, second = gemini.requests
    assert 0.45 <= second.received_at - first.received_at < 1.5
    assert output.image.getpixel((0, 0)) == INVERTED
    assert stages[0] == Stage.VENDOR_SUBMITTED and stages[-1] == Stage.VENDOR_RECEIVED


def test_429_beyond_max_retries_is_overloaded_with_the_vendor_delay(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.retry_delay = "quota", "0.1s"
    error = run_failing(make_provider(gemini, max_retries=1), VendorQuota)

    assert isinstance(error, Overloaded) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "VENDOR_QUOTA" and error.retry_after_s == pytest.approx(0.1)
    assert error.metadata["vendor_reason"] == "RESOURCE_EXHAUSTED" and error.metadata["http_status"] == "429"
    assert error.metadata["quota_id"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    assert len(gemini.requests) == 2
    retry_info = error_details_pb2.RetryInfo()
    assert error.to_status("img2img.kiln.dev").details[1].Unpack(retry_info)
    assert retry_info.retry_delay.ToNanoseconds() == 100_000_000


def test_429_asking_for_too_long_a_wait_is_not_retried(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.retry_delay = "quota", "40s"
    started = time.monotonic()
    error = run_failing(make_provider(gemini, max_retry_delay_s=5.0), VendorQuota)

    assert time.monotonic() - started < 2.0 and len(gemini.requests) == 1
    assert isinstance(error, Overloaded) and error.retry_after_s == pytest.approx(40.0)


def test_429_without_retry_info_is_not_retried(gemini: GeminiStandIn) -> None:
    gemini.scenario = "quota_no_retry_info"
    error = run_failing(make_provider(gemini), VendorQuota)

    assert len(gemini.requests) == 1
    assert isinstance(error, Overloaded) and error.retry_after_s == pytest.approx(60.0)


def test_cancel_interrupts_the_wait_before_a_retry(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.retry_delay = "quota", "10s"
    latency, _ = run_cancelled_after(make_provider(gemini), 0.3)

    assert latency < 0.5 and len(gemini.requests) == 1


@pytest.mark.parametrize(("scenario", "status"), [("internal", "500"), ("unavailable", "503")])
def test_server_errors_are_vendor_unavailable(gemini: GeminiStandIn, scenario: str, status: str) -> None:
    gemini.scenario = scenario
    error = run_failing(make_provider(gemini), VendorUnavailable)

    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "VENDOR_UNAVAILABLE"
    assert error.metadata["http_status"] == status and len(gemini.requests) == 1


def test_unreachable_vendor_is_vendor_unavailable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = GeminiImg2ImgProvider(GeminiSettings(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1beta"))
    error = run_failing(provider, VendorUnavailable)
    assert error.metadata["vendor_reason"] == "ConnectError"


def test_blocked_prompt_is_content_blocked_input(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.block_reason = "blocked_prompt", "PROHIBITED_CONTENT"
    error = run_failing(make_provider(gemini), ContentBlockedInput)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "CONTENT_BLOCKED_INPUT"
    assert error.metadata == {"vendor": "gemini", "vendor_reason": "PROHIBITED_CONTENT", "http_status": "200"}
    assert "blockReason PROHIBITED_CONTENT" in error.message and "rephrase" in error.message


@pytest.mark.parametrize("finish_reason", ["IMAGE_SAFETY", "SAFETY", "IMAGE_PROHIBITED_CONTENT", "RECITATION"])
def test_blocked_output_is_content_blocked_output(gemini: GeminiStandIn, finish_reason: str) -> None:
    gemini.scenario, gemini.finish_reason = "blocked_output", finish_reason
    error = run_failing(make_provider(gemini), ContentBlockedOutput)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "CONTENT_BLOCKED_OUTPUT"
    assert error.metadata["vendor_reason"] == finish_reason and finish_reason in error.message


@pytest.mark.parametrize("finish_reason", ["NO_IMAGE", "MAX_TOKENS"])
def test_other_finish_without_image_is_no_image_produced(gemini: GeminiStandIn, finish_reason: str) -> None:
    gemini.scenario, gemini.finish_reason = "blocked_output", finish_reason
    error = run_failing(make_provider(gemini), NoImageProduced)
    assert error.metadata["vendor_reason"] == finish_reason


def test_text_only_answer_is_no_image_produced_with_the_model_text_truncated(gemini: GeminiStandIn) -> None:
    gemini.scenario = "text_only"
    gemini.model_text = "I can't edit photos of that kind. " + "Let me explain at length. " * 40
    error = run_failing(make_provider(gemini), NoImageProduced)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "NO_IMAGE_PRODUCED"
    assert error.metadata["vendor_reason"] == "STOP"
    assert "I can't edit photos of that kind." in error.message and "…" in error.message
    assert len(error.message) < 400


def test_cancel_aborts_the_http_call(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.slow_s = "slow", 10.0
    latency, stages = run_cancelled_after(make_provider(gemini), 0.3)

    assert latency < 0.5
    assert stages == [Stage.VENDOR_SUBMITTED, Stage.VENDOR_WAITING]
    assert gemini.disconnected.wait(2.0), "the stand-in never saw the connection close"


def test_timeout_is_vendor_unavailable_mentioning_it(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.slow_s = "slow", 10.0
    started = time.monotonic()
    error = run_failing(make_provider(gemini, timeout_s=0.3), VendorUnavailable)

    assert time.monotonic() - started < 1.5
    assert "0.3 s" in error.message and "timeout" in error.message
    assert error.metadata["vendor_reason"] == "TIMEOUT"
    assert gemini.disconnected.wait(2.0)


def test_unknown_model_fails_with_the_vendor_message(gemini: GeminiStandIn) -> None:
    error = run_failing(make_provider(gemini, model="gemini-0-nonexistent"), ProviderFailed)
    assert "HTTP 404 NOT_FOUND" in error.message and "gemini-0-nonexistent" in error.message


@pytest.mark.parametrize("scenario", ["success", "quota_once", "internal", "blocked_prompt", "text_only"])
def test_the_key_never_reaches_the_log(gemini: GeminiStandIn, caplog: pytest.LogCaptureFixture, scenario: str) -> None:
    gemini.scenario, gemini.retry_delay = scenario, "0.05s"
    caplog.set_level(logging.DEBUG)
    with contextlib.suppress(KilnError):
        run(make_provider(gemini))
    with pytest.raises(VendorAuth):  # a rejected key is the likeliest moment to log one
        run(GeminiImg2ImgProvider(GeminiSettings(api_key=KEY + "x", base_url=gemini.base_url)))

    assert any(record.name.startswith("httpcore") for record in caplog.records)  # DEBUG really was captured
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in repr(record.args)
    assert base64.b64encode(KEY.encode()).decode() not in caplog.text


def test_describe_reports_a_vendor_model() -> None:
    description = GeminiImg2ImgProvider(GeminiSettings(api_key=KEY, model="gemini-3-pro-image-preview")).describe()

    assert description.kind == "gemini" and description.model_id == "gemini-3-pro-image-preview"
    assert description.device == "vendor" and description.dtype == ""
    assert description.reproducibility == Reproducibility.NONE
    assert KEY not in repr(description)


def test_load_without_key_names_the_setting() -> None:
    with pytest.raises(ValueError, match="KILN_IMG2IMG__GEMINI__API_KEY"):
        GeminiImg2ImgProvider(GeminiSettings()).load()


def test_jobs_share_one_connection_until_close_and_run_again_after_it(gemini: GeminiStandIn) -> None:
    provider = make_provider(gemini)
    try:
        run(provider)
        run(provider)
        assert (len(gemini.requests), gemini.connections) == (2, 1), "the second job reused the first's connection"
        provider.close()  # what an idle unload does; the model manager may load the same object again
        run(provider)
        assert (len(gemini.requests), gemini.connections) == (3, 2)
    finally:
        provider.close()


def test_parallel_jobs_run_on_the_shared_client_and_a_cancel_stops_only_its_own(gemini: GeminiStandIn) -> None:
    gemini.scenario, gemini.slow_s = "slow", 10.0
    provider = make_provider(gemini)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(run_cancelled_after, provider, 0.3)
            second = pool.submit(run_cancelled_after, provider, 0.9)
            # Each must end by its own cancel: one that ended before it (cut off by the other's)
            # fails with an IndexError, as no cancel time was recorded yet.
            for call in (first, second):
                call.result(timeout=5)
        assert len(gemini.requests) == 2
        gemini.scenario = "success"
        output, _ = run(provider)  # the shared client is still usable after calls were cut off
        assert output.image.getpixel((0, 0)) == INVERTED
    finally:
        provider.close()


def test_every_call_cut_off_by_its_timeout_closes_its_connection(gemini: GeminiStandIn) -> None:
    # httpx's own read timeout and Kiln's overall one fire together here; a connection whose
    # cleanup the second cut short would stay open in the shared pool, and the vendor would
    # go on generating for nobody.
    gemini.scenario, gemini.slow_s = "slow", 10.0
    provider = make_provider(gemini, timeout_s=0.1)
    try:
        for _ in range(20):
            run_failing(provider, VendorUnavailable)
        deadline = time.monotonic() + 5
        while gemini.hang_ups < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gemini.hang_ups == 20
    finally:
        provider.close()

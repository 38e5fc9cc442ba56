"""The page in headless Chromium, through Envoy, against both servers on the tiny models.

Each test drives the page the way a person does (upload, type, click) and then checks what a
person would see and what the servers recorded: events arriving before the result, pixels in
the result image, a mesh in the 3D scene, a freed slot after Cancel, the server's own words for
an invalid input.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image, ImageDraw
from playwright.sync_api import FilePayload

from kiln.img2img.v1 import img2img_service_pb2 as img2img_pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from tests.web.conftest import Tab, Tabs
from tests.web.stack import Stack

pytestmark = pytest.mark.timeout(120)

# Reads every pixel of an <img> through a canvas and counts the distinct colours.
DISTINCT_COLOURS_JS = """(selector) => {
  const img = document.querySelector(selector);
  if (!img || !img.complete || !img.naturalWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const g = canvas.getContext('2d');
  g.drawImage(img, 0, 0);
  const data = g.getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  for (let i = 0; i < data.length; i += 4) colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  return {width: canvas.width, height: canvas.height, colours: colours.size};
}"""

EVENTS_JS = "(job) => window.kiln.events.filter(e => e.job === job)"


def picture(size: int = 128, *, background: tuple[int, int, int] = (24, 40, 64)) -> bytes:
    """A bright disc on a dark background: an object for the mesh model, texture for img2img."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 5, size // 6, size * 4 // 5, size * 5 // 6), fill=(232, 118, 44))
    draw.rectangle((size // 3, size // 2, size * 2 // 3, size * 3 // 5), fill=(250, 220, 120))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(tab: Tab, data: bytes, name: str = "input.png") -> None:
    payload: FilePayload = {"name": name, "mimeType": "image/png", "buffer": data}
    tab.page.set_input_files("#file", files=[payload])
    tab.page.wait_for_selector("#input-preview:not([hidden])")


def fill_generate_form(tab: Tab, *, steps: int, strength: float = 0.75, preview_every: int = 0, seed: int = 7) -> None:
    page = tab.page
    page.fill("#prompt", "a glazed ceramic bowl, studio light")
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))
    page.select_option("#scheduler", "SCHEDULER_EULER")
    # A range input takes a value through script; `input` updates the number shown next to it.
    page.eval_on_selector(
        "#strength", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(strength)
    )
    page.click("#gen-form details.more summary")
    page.set_checked("#live-preview", preview_every > 0)
    if preview_every:
        page.fill("#preview-every", str(preview_every))


def job_id(tab: Tab, selector: str) -> str:
    text = tab.page.text_content(selector) or ""
    return text.removeprefix("job ").strip()


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["kind"] for event in events]


def cancelled_generates(stack: Stack) -> float:
    return stack.img2img.metric("kiln_requests_total", method="Generate", code="CANCELLED")


def wait_idle(stack: Stack, timeout_s: float = 10) -> None:
    """Wait until img2img runs nothing and queues nothing (its own gauges)."""

    def busy() -> float:
        return stack.img2img.metric("kiln_inflight_runs") + stack.img2img.metric("kiln_queue_depth")

    deadline = time.monotonic() + timeout_s
    while busy() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert busy() == 0, stack.img2img.metrics()


def test_generate_shows_progress_then_the_result(tabs: Tabs, stack: Stack) -> None:
    tab = tabs.open()
    page = tab.page
    upload(tab, picture(128))
    fill_generate_form(tab, steps=24, preview_every=3)  # 24 x 0.75 = 18 denoising steps
    page.click("#generate")

    # Mid-run: the bar has moved, a preview is on screen, and the result is not there yet.
    page.wait_for_function(
        """() => +document.getElementById('gen-bar').getAttribute('aria-valuenow') > 0
             && /step/.test(document.getElementById('gen-stage').textContent)
             && !document.getElementById('preview-img').hidden
             && document.getElementById('result-img').hidden"""
    )
    stage_text = page.text_content("#gen-stage") or ""
    assert "Denoising" in stage_text and "step" in stage_text, stage_text
    tabs.screenshot(tab, "running")

    page.wait_for_selector("#result-img:not([hidden])", timeout=60_000)
    events = page.evaluate(EVENTS_JS, "img2img")
    names = kinds(events)
    assert names[0] == "accepted" and names[-1] == "result", names
    progress_times = [e["t"] for e in events if e["kind"] == "progress"]
    result_time = events[-1]["t"]
    assert len(progress_times) >= 18, names
    # Streamed, not buffered: progress arrived spread over time, before the result (the DOM check
    # above already saw a step on screen while the result was not there).
    assert progress_times[-1] - progress_times[0] > 100 and progress_times[0] < result_time, events
    assert len({round(t / 10) for t in progress_times}) >= 5, progress_times
    assert names.count("preview-shown") >= 5, names

    pixels = page.evaluate(DISTINCT_COLOURS_JS, "#result-img")
    assert pixels is not None and pixels["width"] == 128 and pixels["height"] == 128, pixels
    assert pixels["colours"] > 100, pixels  # a real picture, not a blank or flat image

    meta = page.text_content("#result-meta") or ""
    assert "SHA-256 verified" in meta and "Seed7" in meta.replace(" ", ""), meta
    # The server stored what the page shows: same bytes as the download link.
    job = job_id(tab, "#gen-job")
    stored = next((stack.output_dir / job).glob("*.png"))
    downloaded = page.evaluate(
        """async () => {
             const href = document.getElementById('download-image').href;
             const bytes = await (await fetch(href)).arrayBuffer();
             const digest = await crypto.subtle.digest('SHA-256', bytes);
             return Array.from(new Uint8Array(digest), b => b.toString(16).padStart(2, '0')).join('');
           }"""
    )
    assert downloaded == hashlib.sha256(stored.read_bytes()).hexdigest()


def test_make_3d_from_an_upload_loads_the_glb_into_the_viewer(tabs: Tabs, stack: Stack) -> None:
    tab = tabs.open(color_scheme="dark")
    page = tab.page
    upload(tab, picture(128), "bowl.png")
    page.click("#mesh-options summary")
    page.fill("#mc-res", "48")
    page.click("#input-to-3d")

    page.wait_for_function("() => window.kiln.viewer.meshCount() > 0", timeout=60_000)
    assert page.evaluate("() => window.kiln.viewer.webgl()") is True
    page.wait_for_function("() => !document.getElementById('mesh-actions').hidden")

    events = page.evaluate(EVENTS_JS, "mesh")
    names = kinds(events)
    assert names[0] == "accepted" and "progress" in names, names
    # Chunked delivery: the bytes came as chunks before the result, then the viewer loaded them.
    assert names.index("chunk") < names.index("result") < names.index("viewer-loaded"), names
    states = page.eval_on_selector_all("#mesh-stages li", "items => items.map(li => li.dataset.state)")
    assert states and all(state in ("done", "skipped") for state in states), states
    assert states[-2:] == ["done", "done"], states  # download, viewer

    # The scene was drawn: the WebGL canvas holds more than a background colour.
    stats = page.evaluate("() => window.kiln.viewer.pixelStats()")
    assert stats is not None and stats["distinctColors"] > 20, stats
    meta = page.text_content("#mesh-meta") or ""
    assert "SHA-256 verified" in meta and "48³ grid" in meta, meta

    # The GLB button downloads exactly the stored file.
    job = job_id(tab, "#mesh-job")
    stored = next((stack.output_dir / job).glob("*.glb"))
    with page.expect_download() as download_info:
        page.click("#download-glb")
    download = download_info.value
    assert download.suggested_filename == f"kiln-{job}.glb"
    assert Path(download.path()).read_bytes() == stored.read_bytes()
    tabs.screenshot(tab, "viewer")


def test_make_3d_from_the_generated_image(tabs: Tabs, stack: Stack) -> None:
    tab = tabs.open()
    page = tab.page
    upload(tab, picture(96))
    fill_generate_form(tab, steps=4)
    page.click("#generate")
    page.wait_for_selector("#result-img:not([hidden])", timeout=60_000)
    image_job = job_id(tab, "#gen-job")
    page.click("#mesh-options summary")
    page.fill("#mc-res", "32")
    page.click("#result-to-3d")
    page.wait_for_function("() => window.kiln.viewer.meshCount() > 0", timeout=60_000)
    assert image_job in (page.text_content("#mesh-source-label") or "")
    assert (stack.output_dir / job_id(tab, "#mesh-job")).is_dir()


def test_cancel_stops_the_run_and_frees_the_slot(tabs: Tabs, stack: Stack) -> None:
    long_run, queued = tabs.open(), tabs.open()
    cancelled_before = cancelled_generates(stack)

    # A long job (150 steps on a 256 px image: a minute or more here) takes the only slot.
    upload(long_run, picture(256))
    fill_generate_form(long_run, steps=150, strength=1.0)
    long_run.page.click("#generate")
    long_run.page.wait_for_function("() => /step [2-9]/.test(document.getElementById('gen-stage').textContent)")
    long_job = job_id(long_run, "#gen-job")

    # A short job waits behind it, and the page says so.
    upload(queued, picture(96))
    fill_generate_form(queued, steps=4)
    queued.page.click("#generate")
    queued.page.wait_for_function("() => /Queued/.test(document.getElementById('gen-stage').textContent)")
    tabs.screenshot(queued, "queued")

    long_run.page.click("#cancel")
    cancelled_at = time.monotonic()
    long_run.page.wait_for_selector("#gen-alert[data-kind='cancelled']", timeout=15_000)
    assert long_run.page.is_hidden("#cancel") and long_run.page.is_enabled("#generate")
    assert long_run.page.is_hidden("#result-img")
    assert "result" not in kinds(long_run.page.evaluate(EVENTS_JS, "img2img"))

    # The freed slot goes to the waiting job at once, not after the long job's remaining steps.
    queued.page.wait_for_selector("#result-img:not([hidden])", timeout=30_000)
    assert time.monotonic() - cancelled_at < 30

    # Server side: the call ended CANCELLED, nothing runs, and the cancelled job stored nothing.
    deadline = time.monotonic() + 10
    while cancelled_generates(stack) < cancelled_before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_generates(stack) == cancelled_before + 1
    wait_idle(stack)
    assert not (stack.output_dir / long_job).exists()


def test_busy_server_says_when_to_retry(tabs: Tabs, stack: Stack) -> None:
    running, waiting, refused = tabs.open(), tabs.open(), tabs.open()
    for tab, steps in ((running, 150), (waiting, 150)):
        upload(tab, picture(256))
        fill_generate_form(tab, steps=steps, strength=1.0)
        tab.page.click("#generate")
    running.page.wait_for_function("() => /Denoising/.test(document.getElementById('gen-stage').textContent)")
    waiting.page.wait_for_function("() => /Queued/.test(document.getElementById('gen-stage').textContent)")

    # One slot and a queue of one are taken: the server refuses with RESOURCE_EXHAUSTED + RetryInfo.
    upload(refused, picture(96))
    fill_generate_form(refused, steps=4)
    refused.page.click("#generate")
    alert = refused.page.wait_for_selector("#gen-alert[data-kind='busy']", timeout=15_000)
    assert alert is not None
    assert refused.page.get_attribute("#gen-alert", "data-code") == "RESOURCE_EXHAUSTED"
    text = alert.text_content() or ""
    assert "busy" in text and "Retry in" in text, text
    assert "slot(s) busy" in text, text  # the server's own message is shown too
    tabs.screenshot(refused, "busy")

    for tab in (waiting, running):
        tab.page.click("#cancel")
        tab.page.wait_for_selector("#gen-alert[data-kind='cancelled']", timeout=15_000)
    wait_idle(stack)


def server_violation(stack: Stack, **fields: Any) -> tuple[str, str]:
    """Ask img2img directly: the (field, description) of the first BadRequest violation."""
    request = img2img_pb.GenerateRequest(
        prompt="a glazed ceramic bowl",
        scheduler=img2img_pb.SCHEDULER_EULER,
        output_format=img2img_pb.IMAGE_FORMAT_PNG,
        **fields,
    )
    with grpc.insecure_channel(f"127.0.0.1:{stack.img2img.port}") as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(request, timeout=30))
    status = rpc_status.from_call(raised.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    violation = bad.field_violations[0]
    return violation.field, violation.description


def test_invalid_input_shows_the_servers_message(tabs: Tabs, stack: Stack) -> None:
    too_small = picture(32)
    field, description = server_violation(stack, image=too_small)
    assert field == "image"

    tab = tabs.open()
    page = tab.page
    upload(tab, too_small, "tiny.png")
    fill_generate_form(tab, steps=4)
    page.click("#generate")
    page.wait_for_selector("#gen-alert:not([hidden])")
    assert page.get_attribute("#gen-alert", "data-code") == "INVALID_ARGUMENT"
    # The server's description sits next to the image, and the drop zone is marked invalid.
    assert description in (page.text_content("#err-image") or "")
    assert page.get_attribute("#drop", "aria-invalid") == "true"
    assert "Fix the highlighted fields" in (page.text_content("#gen-alert") or "")

    # A problem the server finds after the job started (no surface at this threshold) arrives as
    # the stream's `error` event and still lands next to its field.
    page.click("#mesh-options summary")
    page.fill("#mc-res", "32")
    page.fill("#mc-threshold", "1000")
    upload(tab, picture(128))
    page.click("#input-to-3d")
    page.wait_for_selector("#mesh-alert:not([hidden])", timeout=60_000)
    assert page.get_attribute("#mesh-alert", "data-code") == "INVALID_ARGUMENT"
    assert "accepted" in kinds(page.evaluate(EVENTS_JS, "mesh"))
    assert (page.text_content("#err-mc_threshold") or "").startswith("Surface threshold")
    assert page.get_attribute("#mc-threshold", "aria-invalid") == "true"


def test_unreachable_gateway_is_explained(tabs: Tabs) -> None:
    tab = tabs.open()
    page = tab.page
    # The connection fails before any answer: what a stopped gateway or a dropped network looks like.
    page.route("**/kiln.img2img.v1.Img2ImgProvider/Generate", lambda route: route.abort("connectionrefused"))
    upload(tab, picture(96))
    fill_generate_form(tab, steps=4)
    page.click("#generate")
    page.wait_for_selector("#gen-alert:not([hidden])")
    text = page.text_content("#gen-alert") or ""
    assert "Can't reach the gateway" in text and "Retry" in text, text
    assert page.is_enabled("#generate") and page.is_hidden("#cancel")


def test_page_fits_a_phone_screen(tabs: Tabs) -> None:
    tab = tabs.open(width=390, height=844)
    page = tab.page
    upload(tab, picture(96))
    # One column, nothing wider than the screen, and the main action within reach of a thumb.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    box = page.locator("#generate").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390

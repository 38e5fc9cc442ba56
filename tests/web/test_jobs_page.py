"""Jobs that outlive the page, in headless Chromium through Envoy against the tiny models.

A reload mid-generation reattaches to the same job (WatchJob from the last sequence the page
handled, with the gateway's session header) and its progress and result show; the model ran
once. A finished job's result comes back after another reload, and a job the server no longer
has drops out of the list without a word. The same for a mesh. The jobs list cancels a running
job it only lists and the queued job the panel follows. A gateway restart mid-stream is bridged
by the page itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.kiln_gateway.render import SESSION_HEADER
from kiln.common.v1 import job_pb2 as job_pb
from kiln.img2img.v1 import img2img_service_pb2 as img2img_pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from tests.web.conftest import Tab, Tabs
from tests.web.stack import Stack
from tests.web.test_page import (
    DISTINCT_COLOURS_JS,
    fill_generate_form,
    job_id,
    picture,
    upload,
    wait_idle,
)

pytestmark = pytest.mark.timeout(240)

#: One job's stream events as the page logged them (a "watch" entry marks a reattach and its cursor).
JOB_EVENTS_JS = "(job) => window.kiln.events.filter(e => e.jobId === job)"
#: The number after "step" in the progress label, or 0.
SHOWN_STEP_JS = "() => +((document.getElementById('gen-stage').textContent.match(/step (\\d+)/) || [0, 0])[1])"
#: A well-formed job id (26 characters of Crockford base32) that no server issued.
UNKNOWN_JOB = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def model_runs(stack: Stack) -> float:
    """Finished img2img runs: each stores its image once (the `store` phase of the run's timings)."""
    return stack.img2img.metric("kiln_phase_duration_seconds_count", phase="store")


def requests(stack: Stack, method: str) -> float:
    return stack.img2img.metric("kiln_requests_total", method=method)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    """Poll a server-side condition (metrics settle after the status is sent)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def start_generation(tab: Tab, *, size: int, steps: int) -> None:
    upload(tab, picture(size))
    fill_generate_form(tab, steps=steps, strength=1.0)
    tab.page.click("#generate")


def reload(tab: Tab) -> None:
    tab.page.reload()
    tab.page.wait_for_function("() => window.kiln && window.kiln.info.img2img && window.kiln.info.mesh")


def saved_jobs(tab: Tab) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = tab.page.evaluate("() => window.kiln.jobs()")
    return jobs


def row(job: str, part: str = "") -> str:
    return f'#jobs-list li[data-job="{job}"] {part}'.strip()


def test_reload_mid_generation_continues_the_same_job(tabs: Tabs, stack: Stack) -> None:
    runs_before, generates_before = model_runs(stack), requests(stack, "Generate")
    tab = tabs.open()
    page = tab.page
    # 60 steps on a 256 px image: long enough to be mid-run when the page reloads.
    start_generation(tab, size=256, steps=60)
    page.wait_for_function(f"() => ({SHOWN_STEP_JS})() >= 3")
    job = job_id(tab, "#gen-job")
    seen = [event["sequence"] for event in page.evaluate(JOB_EVENTS_JS, job)]
    # Sequences from the start: 1 for `accepted`, then one more per event.
    assert seen == list(range(1, len(seen) + 1)), seen
    step_before = page.evaluate(SHOWN_STEP_JS)
    saved = saved_jobs(tab)
    assert saved[0]["id"] == job and saved[0]["lastSequence"] >= seen[-1], saved
    # Through the gateway the Generate response named its replica; the page kept that value and
    # sends it back on the job's WatchJob, so that it reaches the replica running the job.
    session = saved[0].get("session")
    assert session, saved
    watches: list[str | None] = []
    page.on(
        "request",
        lambda request: watches.append(request.header_value(SESSION_HEADER)) if "/WatchJob" in request.url else None,
    )
    assert page.is_visible(row(job)) and page.get_attribute(row(job), "data-state") == "running"
    tabs.screenshot(tab, "before-reload")

    reload(tab)
    # The page reattached to the same job and its progress goes on in the main view.
    page.wait_for_function(
        "([job, step]) => document.getElementById('gen-job').textContent.includes(job)"
        f" && (({SHOWN_STEP_JS})() > step || !document.getElementById('result-img').hidden)",
        arg=[job, step_before],
    )
    tabs.screenshot(tab, "after-reload")
    page.wait_for_selector("#result-img:not([hidden])", timeout=120_000)
    assert job_id(tab, "#gen-job") == job

    assert watches == [session], watches
    events = page.evaluate(JOB_EVENTS_JS, job)
    assert events[0]["kind"] == "watch", events
    cursor = events[0]["sequence"]
    assert cursor >= seen[-1], (cursor, seen)
    # Every event after the cursor exactly once, in order, up to the result: no gap, no repeat.
    resumed = [event["sequence"] for event in events[1:]]
    assert resumed == list(range(cursor + 1, cursor + 1 + len(resumed))), events
    kinds = [event["kind"] for event in events[1:]]
    assert kinds[-1] == "result" and "progress" in kinds and "accepted" not in kinds, kinds
    pixels = page.evaluate(DISTINCT_COLOURS_JS, "#result-img")
    assert pixels is not None and pixels["width"] == 256 and pixels["colours"] > 100, pixels
    assert "SHA-256 verified" in (page.text_content("#result-meta") or "")
    page.wait_for_selector(row(job) + '[data-state="succeeded"]')

    # The model ran once for this job: one Generate, one run, one stored result.
    wait_for(lambda: model_runs(stack) >= runs_before + 1, "the run to be counted")
    assert model_runs(stack) == runs_before + 1
    assert requests(stack, "Generate") == generates_before + 1
    assert [path.name for path in (stack.output_dir / job).iterdir() if path.suffix == ".png"]

    # Another reload: the finished job's result comes back from the store (GetJob, then the
    # image by reference), and a job the server does not know leaves the list quietly.
    page.evaluate(
        """(unknown) => {
             const jobs = JSON.parse(localStorage.getItem('kiln.jobs.v1'));
             jobs.push({id: unknown, service: 'img2img', lastSequence: 3, created: Date.now() - 7200000});
             localStorage.setItem('kiln.jobs.v1', JSON.stringify(jobs));
           }""",
        UNKNOWN_JOB,
    )
    reload(tab)
    page.wait_for_selector("#result-img:not([hidden])", timeout=30_000)
    assert job_id(tab, "#gen-job") == job
    assert page.evaluate(DISTINCT_COLOURS_JS, "#result-img")["colours"] > 100
    page.wait_for_function("(unknown) => !window.kiln.jobs().some(j => j.id === unknown)", arg=UNKNOWN_JOB)
    assert page.is_hidden("#jobs-alert") and page.is_hidden("#gen-alert")
    assert page.get_attribute(row(job), "data-state") == "succeeded"
    assert page.is_hidden(row(job, '[data-action="cancel"]'))
    assert model_runs(stack) == runs_before + 1  # showing it again ran nothing


def test_jobs_list_cancels_a_running_and_a_queued_job(tabs: Tabs, stack: Stack) -> None:
    first = tabs.open()
    # A second page of the same browser (same localStorage), opened while it has no jobs yet.
    second = Tab(first.context.new_page(), first.context)
    second.page.on("pageerror", lambda error: second.errors.append(str(error)))
    second.page.goto(stack.url)
    second.page.wait_for_function("() => window.kiln && window.kiln.info.img2img")

    # The first page's job takes the only slot (150 steps: minutes here); the second one queues
    # behind it, and is long enough to be still running when it is cancelled.
    start_generation(first, size=256, steps=150)
    first.page.wait_for_function(f"() => ({SHOWN_STEP_JS})() >= 2")
    running = job_id(first, "#gen-job")
    start_generation(second, size=128, steps=150)
    second.page.wait_for_function("() => /Queued/.test(document.getElementById('gen-stage').textContent)")
    queued = job_id(second, "#gen-job")

    # After a reload the first page lists both; its panel follows the newest live one (queued).
    reload(first)
    page = first.page
    page.wait_for_selector(row(running) + '[data-state="running"]')
    page.wait_for_function("(job) => document.getElementById('gen-job').textContent.includes(job)", arg=queued)
    page.wait_for_selector(row(queued) + '[data-state="queued"]')
    tabs.screenshot(first, "two-jobs")

    # Cancel the running job from the list (no panel follows it here: CancelJob directly).
    page.click(row(running, '[data-action="cancel"]'))
    page.wait_for_selector(row(running) + '[data-state="cancelled"]', timeout=15_000)
    assert page.is_hidden(row(running, '[data-action="cancel"]'))
    # The freed slot goes to the queued job, which both pages follow.
    page.wait_for_selector(row(queued) + '[data-state="running"]', timeout=30_000)
    second.page.wait_for_function("() => /step/.test(document.getElementById('gen-stage').textContent)")

    # Cancel that one from the list too: the panel follows it, so it says so as after its Cancel
    # button, and so does the other page following it.
    page.click(row(queued, '[data-action="cancel"]'))
    page.wait_for_selector("#gen-alert[data-kind='cancelled']", timeout=15_000)
    second.page.wait_for_selector("#gen-alert[data-kind='cancelled']", timeout=15_000)
    page.wait_for_selector(row(queued) + '[data-state="cancelled"]')
    tabs.screenshot(first, "cancelled")

    # Server side: both jobs are CANCELLED, nothing runs, and neither stored anything.
    with grpc.insecure_channel(f"127.0.0.1:{stack.img2img.port}") as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        for job in (running, queued):
            status = stub.GetJob(img2img_pb.GetJobRequest(job_id=job), timeout=10).job.status
            assert status.state == job_pb.JOB_STATE_CANCELLED, (job, status)
    wait_idle(stack)
    assert not (stack.output_dir / running).exists() and not (stack.output_dir / queued).exists()
    assert not second.errors, second.errors


def test_reload_during_make_3d_brings_the_mesh_back(tabs: Tabs, stack: Stack) -> None:
    tab = tabs.open()
    page = tab.page
    upload(tab, picture(128), "bowl.png")
    page.click("#mesh-options summary")
    page.fill("#mc-res", "256")  # a few seconds of surface extraction: usually still running at the reload
    page.click("#input-to-3d")
    page.wait_for_function("() => window.kiln.events.some(e => e.job === 'mesh' && e.kind === 'progress')")
    job = job_id(tab, "#mesh-job")

    # Whether the job is still running after the reload (reattached) or already done (shown
    # from the store), the mesh of the same job ends up in the viewer, checked and downloadable.
    reload(tab)
    page.wait_for_function("() => window.kiln.viewer.meshCount() > 0", timeout=60_000)
    assert job_id(tab, "#mesh-job") == job
    events = page.evaluate(JOB_EVENTS_JS, job)
    if events:  # reattached mid-run: every event after the cursor once, chunks and result included
        assert events[0]["kind"] == "watch", events
        resumed = [event["sequence"] for event in events[1:]]
        assert resumed == list(range(events[0]["sequence"] + 1, events[0]["sequence"] + 1 + len(resumed)))
        assert events[-1]["kind"] == "result", events
    assert "SHA-256 verified" in (page.text_content("#mesh-meta") or "")
    page.wait_for_selector(row(job) + '[data-state="succeeded"]')
    stored = next((stack.output_dir / job).glob("*.glb"))
    with page.expect_download() as download_info:
        page.click("#download-glb")
    assert download_info.value.suggested_filename == f"kiln-{job}.glb"
    assert Path(download_info.value.path()).read_bytes() == stored.read_bytes()


def restart_gateway(stack: Stack) -> None:
    """Stop Envoy (every open stream breaks) and start it again on the same port: a gateway restart."""
    port = stack.envoy.port
    stack.envoy.stop()
    stack.envoy.settings = stack.envoy.settings.model_copy(update={"port": port})
    stack.envoy.admin_port = 0  # a new admin port: start() waits for the one the new process reports
    stack.envoy.start()
    assert stack.envoy.port == port


def test_a_gateway_restart_mid_generation_is_bridged(tabs: Tabs, stack: Stack) -> None:
    # Last in this module: it restarts the module's gateway.
    runs_before = model_runs(stack)
    tab = tabs.open()
    page = tab.page
    start_generation(tab, size=256, steps=60)
    page.wait_for_function(f"() => ({SHOWN_STEP_JS})() >= 2")
    job = job_id(tab, "#gen-job")

    restart_gateway(stack)
    # The stream broke after `accepted`: the page reattaches with WatchJob by itself (the job kept
    # running on the server meanwhile) and the same job ends with its result, no alert shown.
    page.wait_for_selector("#result-img:not([hidden])", timeout=120_000)
    assert job_id(tab, "#gen-job") == job and page.is_hidden("#gen-alert")
    events = page.evaluate(JOB_EVENTS_JS, job)
    kinds = [event["kind"] for event in events]
    assert "reconnecting" in kinds and kinds[-1] == "result", kinds
    # Every event exactly once and in order across the break.
    sequences = [event["sequence"] for event in events if event["kind"] != "reconnecting"]
    assert sequences == list(range(1, len(sequences) + 1)), events
    wait_for(lambda: model_runs(stack) >= runs_before + 1, "the run to be counted")
    assert model_runs(stack) == runs_before + 1

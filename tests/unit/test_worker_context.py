"""What runs off the event loop: provider log lines keep their ids, job folders go in a thread.

A provider runs in a worker thread (and a vendor provider's HTTP call on its client's loop
thread); both must see the request's context variables, or the JSON log lines they write lose
`request_id` and `job_id`. Removing a job folder is file I/O that can take long on a slow disk
or a bucket, so it must never run on the event loop.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.img2img.v1 import img2img_service_pb2 as img2img_pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh_pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_img2img import convert
from kiln_runtime.errors import Cancelled
from kiln_runtime.job_api import StoreRecorder
from kiln_runtime.job_table import DisconnectPolicy, JobState, JobTable, Submission
from kiln_runtime.jobs import JobOutput, JobRunner
from kiln_runtime.limits import AdmissionController
from kiln_runtime.provider import RunContext
from kiln_runtime.settings import JobsSettings
from kiln_runtime.storage import LocalArtifactStore
from kiln_runtime.telemetry.logging import JsonFormatter
from kiln_runtime.telemetry.metrics import ServiceMetrics
from tests.servers import StartServer
from tests.standins.gemini import GeminiStandIn
from tests.standins.stable_fast_3d import StableFast3DStandIn
from tests.support import png_bytes

KEY = "test-key-0123456789"
REQUEST_ID = "req-worker-context-1"


class FormattedAtEmit(logging.Handler):
    """Formats each record where it is logged: the context variables are read in that thread."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)) | {"thread": record.threadName})


@pytest.fixture
def gemini() -> Iterator[GeminiStandIn]:
    with GeminiStandIn(api_key=KEY) as server:
        yield server


@pytest.fixture
def sf3d() -> Iterator[StableFast3DStandIn]:
    with StableFast3DStandIn(api_key=KEY) as server:
        yield server


def capture(caplog: pytest.LogCaptureFixture, logger_name: str) -> FormattedAtEmit:
    caplog.set_level(logging.INFO, logger=logger_name)  # restored by caplog at teardown
    handler = FormattedAtEmit()
    logging.getLogger(logger_name).addHandler(handler)
    return handler


async def accepted_job_id(call: Any) -> str:
    events = [event async for event in call]
    assert events[-1].WhichOneof("event") == "result", events[-1]
    return str(events[0].accepted.job_id)


async def test_a_line_logged_on_the_vendor_client_thread_carries_the_ids(
    start_server: StartServer, gemini: GeminiStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    handler = capture(caplog, "kiln_img2img.providers.gemini")
    _, channel = await start_server(provider="gemini", gemini={"api_key": KEY, "base_url": gemini.base_url})
    request = img2img_pb.GenerateRequest(
        image=png_bytes(),
        prompt="make it a watercolor",
        scheduler=img2img_pb.SCHEDULER_EULER,
        output_format=img2img_pb.IMAGE_FORMAT_PNG,
    )
    try:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        job_id = await accepted_job_id(stub.Generate(request, metadata=[("x-request-id", REQUEST_ID)]))
    finally:
        logging.getLogger("kiln_img2img.providers.gemini").removeHandler(handler)
    [line] = [line for line in handler.lines if line["message"].startswith("gemini answered HTTP 200")]
    assert line["thread"].startswith("kiln-gemini-http"), "logged on the provider's shared client thread"
    assert (line.get("request_id"), line.get("job_id")) == (REQUEST_ID, job_id)


async def test_a_line_logged_in_the_worker_thread_carries_the_ids(
    start_server: StartServer, sf3d: StableFast3DStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    handler = capture(caplog, "kiln_mesh.providers.stable_fast_3d")
    _, channel = await start_server(
        "mesh", provider="stable_fast_3d", stable_fast_3d={"api_key": KEY, "base_url": sf3d.base_url}
    )
    request = mesh_pb.GenerateRequest(image=png_bytes(), output_format=mesh_pb.MESH_FORMAT_GLB)
    try:
        stub = mesh_grpc.MeshProviderStub(channel)
        job_id = await accepted_job_id(stub.Generate(request, metadata=[("x-request-id", REQUEST_ID)]))
    finally:
        logging.getLogger("kiln_mesh.providers.stable_fast_3d").removeHandler(handler)
    [line] = [line for line in handler.lines if line["message"].startswith("stable fast 3d answer:")]
    assert line["thread"].startswith("kiln-run"), "logged by the job's worker thread itself"
    assert (line.get("request_id"), line.get("job_id")) == (REQUEST_ID, job_id)


class ThreadRecordingStore(LocalArtifactStore):
    """A real local store that notes which thread removed each job folder."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.deleted_by: list[int] = []

    def delete_job(self, job_id: str) -> None:
        self.deleted_by.append(threading.get_ident())
        super().delete_job(job_id)


async def test_the_folder_of_a_cancelled_job_is_removed_off_the_event_loop(tmp_path: Path) -> None:
    store = ThreadRecordingStore(tmp_path)
    recorder = StoreRecorder(store, convert.JOB_MESSAGES, domain="d", replica="me", settings=JobsSettings())
    table = JobTable(JobsSettings(), recorder=recorder)
    runner = JobRunner(
        admission=AdmissionController(1, 0),
        store=store,
        metrics=ServiceMetrics("img2img"),
        max_message_bytes=4 << 20,
        max_inline_bytes=1 << 20,
    )

    def work(ctx: RunContext) -> JobOutput[None]:
        store.put(ctx.job_id, "partial.png", b"half an image", media_type="image/png")
        raise Cancelled("the vendor dropped the job")  # as a provider that sees its job go away

    submission = Submission(request=None, client_request_id="", fingerprint="f", policy=DisconnectPolicy.CANCEL)
    try:
        job = await table.submit(runner.run(work), submission)
        await job._finished.wait()
    finally:
        runner.shutdown()
    assert job.state is JobState.CANCELLED
    assert store.job_ids() == [], "nothing of the cancelled job is left"
    # The runner removes what the work stored, the table the job's record: two removals.
    assert len(store.deleted_by) >= 2
    assert threading.get_ident() not in store.deleted_by, "a job folder was removed on the event loop"

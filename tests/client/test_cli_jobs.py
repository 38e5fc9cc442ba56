"""`kiln jobs list|get|watch|cancel` and `kiln img2img|mesh --detach`, end to end: the installed
console script against real servers (fake provider), and through a real Envoy."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path

from kiln.common.v1 import job_pb2
from kiln_client import AsyncImg2ImgClient
from kiln_runtime.server import KilnServer
from tests.client.test_cli import kiln, photo, start_kiln, until_accepted
from tests.gateway.conftest import envoy_running
from tests.jobs_support import eventually
from tests.servers import StartServer

__all__ = ["photo"]  # the fixture, shared with the other CLI tests

#: Seconds a condition the servers must reach gets (two busy cores): generous, never asserted.
PATIENCE_S = 30.0
UNKNOWN_JOB = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


async def job_state(server: KilnServer, job_id: str) -> int:
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=PATIENCE_S) as client:
        return int((await client.get_job(job_id)).status.state)


async def test_detach_leaves_the_job_running_and_watch_writes_its_result(
    start_server: StartServer, tmp_path: Path, photo: Path
) -> None:
    server, _ = await start_server("img2img", fake={"steps": 40, "step_delay_s": 0.05})
    target = f"127.0.0.1:{server.port}"
    detached = await kiln("img2img", str(photo), "-p", "a fox", "--detach", "--target", target, cwd=tmp_path)
    assert detached.code == 0, detached.stderr
    (job_id,) = detached.stdout.split()
    assert f"follow it with: kiln jobs watch {job_id} --service img2img --target {target}" in detached.stderr
    assert "--session" not in detached.stderr  # no gateway, no session
    assert await job_state(server, job_id) in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)

    watched = await kiln("jobs", "watch", job_id, "-o", "fox.png", "--target", target, cwd=tmp_path)
    assert watched.code == 0, watched.stderr
    lines = watched.stderr.splitlines()
    assert lines[0] == f"accepted job {job_id}"  # replayed from the start
    assert [line.split()[1] for line in lines if line.startswith("denoise")][-1] == "40/40"
    assert lines[-1].startswith("wrote fox.png (")

    got = await kiln("jobs", "get", job_id, "--json", "--target", target, cwd=tmp_path)
    assert got.code == 0, got.stderr
    (job,) = got.json_lines()
    assert job["service"] == "img2img" and job["status"]["state"] == "JOB_STATE_SUCCEEDED"
    assert job["status"]["disconnectPolicy"] == "DISCONNECT_POLICY_DETACH"
    assert job["request"]["prompt"] == "a fox" and "image" not in job["request"]
    (artifact,) = job["result"]["artifacts"]
    assert hashlib.sha256((tmp_path / "fox.png").read_bytes()).hexdigest() == artifact["sha256"]

    listed = await kiln("jobs", "list", "--state", "succeeded", "--target", target, cwd=tmp_path)
    assert listed.code == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert line.startswith(f"{job_id}  img2img  succeeded") and artifact["id"] in line
    none_running = await kiln("jobs", "list", "--state", "running", "--json", "--target", target, cwd=tmp_path)
    assert none_running.code == 0 and none_running.stdout == "" and "no jobs" in none_running.stderr


async def test_jobs_cancel_stops_a_detached_job(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    server, _ = await start_server("img2img", fake={"steps": 400, "step_delay_s": 0.05})
    target = f"127.0.0.1:{server.port}"
    detached = await kiln("img2img", str(photo), "-p", "x", "--detach", "-q", "--target", target, cwd=tmp_path)
    assert detached.code == 0 and detached.stderr == ""  # --quiet: the id alone
    job_id = detached.stdout.strip()
    await eventually(lambda: server.runtime.admission.running == 1, PATIENCE_S)
    running = await kiln("jobs", "list", "--state", "running", "--target", target, cwd=tmp_path)
    assert running.stdout.startswith(f"{job_id}  img2img  running")

    cancelled = await kiln("jobs", "cancel", job_id, "--service", "img2img", "--target", target, cwd=tmp_path)
    assert cancelled.code == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"job {job_id} cancelled"
    await eventually(lambda: server.runtime.admission.running == 0, PATIENCE_S)  # the slot is free
    again = await kiln("jobs", "cancel", job_id, "--target", target, cwd=tmp_path)
    assert again.stdout.strip() == f"job {job_id} had already ended: cancelled"

    watched = await kiln("jobs", "watch", job_id, "--target", target, cwd=tmp_path)
    assert watched.code == 11  # 10 + CANCELLED
    assert watched.stderr.splitlines()[-1].startswith("kiln: cancelled [CANCELLED]: ")
    assert not list(tmp_path.glob(f"{job_id}*"))
    unknown = await kiln("jobs", "get", UNKNOWN_JOB, "--target", target, cwd=tmp_path)
    assert unknown.code == 15 and "[NOT_FOUND]" in unknown.stderr


async def test_mesh_detach_and_jobs_commands_find_the_service(
    start_server: StartServer, tmp_path: Path, photo: Path
) -> None:
    server, _ = await start_server("mesh", fake={"steps": 20, "step_delay_s": 0.05})
    target = f"127.0.0.1:{server.port}"
    detached = await kiln("mesh", str(photo), "--detach", "--target", target, cwd=tmp_path)
    assert detached.code == 0, detached.stderr
    job_id = detached.stdout.strip()
    # No --service: img2img is asked first (not served here), then mesh.
    watched = await kiln("jobs", "watch", job_id, "--target", target, cwd=tmp_path)
    assert watched.code == 0, watched.stderr
    assert (tmp_path / f"{job_id}.glb").read_bytes()[:4] == b"glTF"
    got = await kiln("jobs", "get", job_id, "--target", target, cwd=tmp_path)
    assert got.code == 0, got.stderr
    lines = got.stdout.splitlines()
    assert lines[0] == f"job {job_id} (mesh)"
    assert lines[1].startswith("  state     succeeded: ")
    assert any(line.startswith(f"  artifact  {job_id}/") and "model/gltf-binary" in line for line in lines)


async def test_through_the_gateway_detach_prints_the_session_that_watch_takes(
    start_server: StartServer, tmp_path: Path, photo: Path
) -> None:
    img2img, _ = await start_server("img2img", fake={"steps": 20, "step_delay_s": 0.05})
    async with envoy_running([img2img.port]) as envoy:
        target = f"127.0.0.1:{envoy.port}"
        detached = await kiln("img2img", str(photo), "-p", "x", "--detach", "--json", "--target", target, cwd=tmp_path)
        assert detached.code == 0, detached.stderr
        accepted, summary = detached.json_lines()
        job_id, session = summary["detached"]["jobId"], summary["detached"]["session"]
        assert accepted["accepted"]["jobId"] == job_id and accepted["sequence"] == "1"
        assert session and f"--session {session}" in detached.stderr
        watched = await kiln(
            "jobs", "watch", job_id, "--session", session, "--target", target, "-o", "g.png", cwd=tmp_path
        )
    assert watched.code == 0, watched.stderr
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")


async def test_ctrl_c_cancels_the_job_with_cancel_job_not_the_grace_period(
    start_server: StartServer, tmp_path: Path, photo: Path
) -> None:
    # The request keeps the default policy (a dropped connection waits 60 s for a watcher); the
    # job still ends at once, because the client sends CancelJob when Ctrl-C leaves the stream.
    server, _ = await start_server("img2img", fake={"steps": 400, "step_delay_s": 0.05})
    target = f"127.0.0.1:{server.port}"
    process = await start_kiln("img2img", str(photo), "-p", "x", "--target", target, cwd=tmp_path)
    await until_accepted(process)
    await eventually(lambda: server.runtime.admission.running == 1, PATIENCE_S)
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(PATIENCE_S):
        _, stderr = await process.communicate()
    assert process.returncode == 130
    assert stderr.decode().strip().endswith("kiln: interrupted; the job was cancelled")
    listed = await kiln("jobs", "list", "--json", "--target", target, cwd=tmp_path)
    (job,) = listed.json_lines()
    assert job["status"]["state"] == "JOB_STATE_CANCELLED"
    assert job["status"]["disconnectPolicy"] == "DISCONNECT_POLICY_WAIT_FOR_WATCHER"  # the default
    assert job["status"]["error"]["message"] == "cancelled by CancelJob"

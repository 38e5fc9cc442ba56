"""The `kiln` command end to end: the installed console script against real servers and Envoy.

Each run is a subprocess (`.venv/bin/kiln`), started with asyncio so the servers on the test's
event loop keep answering while it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import envoy_running
from tests.servers import StartServer
from tests.support import png_bytes

KILN = Path(sys.executable).with_name("kiln")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


async def start_kiln(*args: str, cwd: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "KILN_TARGET": "127.0.0.1:1"}  # a test must name its target
    return await asyncio.create_subprocess_exec(
        str(KILN), *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def until_accepted(process: asyncio.subprocess.Process) -> str:
    """Read the command's stderr up to its `accepted job <id>` line; the lines read.

    Ctrl-C before the client has seen `accepted` cannot name the job in a CancelJob: the job then
    follows its disconnect policy (by default a grace period for a watcher), as documented.
    """
    assert process.stderr is not None
    lines = []
    async with asyncio.timeout(60):
        while line := (await process.stderr.readline()).decode():
            lines.append(line)
            if line.startswith("accepted job "):
                return "".join(lines)
    raise AssertionError(f"the command ended before its job was accepted: {''.join(lines)!r}")


async def kiln(*args: str, cwd: Path) -> Run:
    process = await start_kiln(*args, cwd=cwd)
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes((96, 64)))
    return path


async def test_img2img_writes_the_image_and_reports_progress(
    start_server: StartServer, tmp_path: Path, photo: Path
) -> None:
    server, _ = await start_server("img2img", fake={"steps": 3})
    target = f"127.0.0.1:{server.port}"
    run = await kiln(
        "img2img", str(photo), "-p", "a red fox", "--seed", "5", "--target", target, "-o", "fox.png", cwd=tmp_path
    )
    assert run.code == 0, run.stderr
    output = tmp_path / "fox.png"
    assert output.read_bytes().startswith(b"\x89PNG")
    lines = run.stderr.splitlines()
    assert lines[0].startswith("accepted job ")
    assert [line.split()[1] for line in lines if line.startswith("denoise")] == ["1/3", "2/3", "3/3"]
    assert lines[-1].startswith("wrote fox.png (") and "seed 5" in lines[-1]


async def test_img2img_json_lines_are_the_events(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    server, _ = await start_server("img2img", fake={"steps": 2})
    run = await kiln(
        "img2img", str(photo), "-p", "x", "--json", "--target", f"127.0.0.1:{server.port}", "-o", "o.png", cwd=tmp_path
    )
    assert run.code == 0, run.stderr
    events = run.json_lines()
    kinds = [next(iter(event)) for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    assert kinds.count("progress") == 2
    assert events[1]["progress"]["stage"] == "STAGE_DENOISE" and events[1]["progress"]["totalSteps"] == 2
    (artifact,) = events[-1]["result"]["artifacts"]
    assert hashlib.sha256((tmp_path / "o.png").read_bytes()).hexdigest() == artifact["sha256"]
    assert "accepted job" not in run.stderr  # --json replaces the progress lines


async def test_preview_is_kept_next_to_the_output(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    server, _ = await start_server("img2img", fake={"steps": 4})
    run = await kiln(
        "img2img", str(photo), "-p", "x", "--preview", "2", "--target", f"127.0.0.1:{server.port}", "-o", "p.png",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert (tmp_path / "p.preview.webp").read_bytes()[8:12] == b"WEBP"


async def test_invalid_argument_is_one_line_and_exit_13(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    server, _ = await start_server("img2img")
    target = f"127.0.0.1:{server.port}"
    run = await kiln("img2img", str(photo), "-p", "x", "--strength", "3", "--target", target, cwd=tmp_path)
    assert run.code == 13
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith("kiln: invalid request: strength: ")
    as_json = await kiln(
        "img2img", str(photo), "-p", "x", "--strength", "3", "--json", "--target", target, cwd=tmp_path
    )
    (error,) = as_json.json_lines()
    assert error["error"]["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["error"]["field_violations"]] == ["strength"]
    assert not list(tmp_path.glob("photo-kiln*"))


async def test_busy_server_says_when_to_retry(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    server, _ = await start_server(
        "img2img", fake={"steps": 100, "step_delay_s": 0.05}, runtime={"max_concurrency": 1, "max_queue": 0}
    )
    target = f"127.0.0.1:{server.port}"
    holder = await start_kiln("img2img", str(photo), "-p", "hold", "--target", target, cwd=tmp_path)
    try:
        while server.runtime.admission.running == 0:
            await asyncio.sleep(0.02)
        run = await kiln("img2img", str(photo), "-p", "x", "--retries", "0", "--target", target, cwd=tmp_path)
    finally:
        holder.kill()
        await holder.wait()
    assert run.code == 18
    assert run.stderr.startswith("kiln: server busy, retry in ") and " s (" in run.stderr


async def test_unreachable_target_exit_24_names_the_fix(tmp_path: Path, photo: Path) -> None:
    run = await kiln("img2img", str(photo), "-p", "x", "--target", "127.0.0.1:1", "--retries", "0", cwd=tmp_path)
    assert run.code == 24
    assert "make up" in run.stderr and "--target" in run.stderr


async def test_missing_input_is_a_local_error(tmp_path: Path) -> None:
    run = await kiln("mesh", "nope.png", "--target", "127.0.0.1:1", cwd=tmp_path)
    assert run.code == 1
    assert run.stderr.startswith("kiln: cannot read nope.png")


async def test_mesh_format_follows_the_output_suffix(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    server, _ = await start_server("mesh")
    run = await kiln("mesh", str(photo), "-o", "chair.obj", "--target", f"127.0.0.1:{server.port}", cwd=tmp_path)
    assert run.code == 0, run.stderr
    text = (tmp_path / "chair.obj").read_text()
    assert any(line.startswith("v ") for line in text.splitlines())
    assert any(line.startswith("f ") for line in text.splitlines())
    assert "vertices" in run.stderr.splitlines()[-1]


async def test_health_and_info_of_a_single_server(start_server: StartServer, tmp_path: Path) -> None:
    server, _ = await start_server("img2img")
    target = f"127.0.0.1:{server.port}"
    health = await kiln("health", "--target", target, cwd=tmp_path)
    assert health.code == 0, health.stderr
    assert health.stdout.splitlines() == ["img2img: SERVING", f"mesh: not served at {target}"]
    only_mesh = await kiln("health", "--service", "mesh", "--target", target, cwd=tmp_path)
    assert only_mesh.code == 15
    info = await kiln("info", "--json", "--target", target, cwd=tmp_path)
    assert info.code == 0, info.stderr
    (answer,) = info.json_lines()
    assert answer["service"] == "img2img" and answer["model"]["provider"] == "fake"


async def test_info_says_whether_the_model_is_in_memory(start_server: StartServer, tmp_path: Path) -> None:
    lazy, _ = await start_server("mesh", runtime={"load_on_startup": False, "keep_alive": 300})
    run = await kiln("info", "--service", "mesh", "--target", f"127.0.0.1:{lazy.port}", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "  memory    unloaded (the next job loads it), unloads after 300 s idle" in run.stdout.splitlines()
    loaded, _ = await start_server("img2img")
    run = await kiln("info", "--service", "img2img", "--target", f"127.0.0.1:{loaded.port}", cwd=tmp_path)
    (memory,) = [line for line in run.stdout.splitlines() if line.startswith("  memory")]
    assert memory.startswith("  memory    loaded, last load ") and memory.endswith(" s, stays loaded")


async def test_health_reports_a_loading_model(start_server: StartServer, tmp_path: Path) -> None:
    server, _ = await start_server("mesh", wait_ready=False, fake={"load_delay_s": 30})
    run = await kiln("health", "--service", "mesh", "--target", f"127.0.0.1:{server.port}", cwd=tmp_path)
    assert run.code == 24
    assert run.stdout.strip() == "mesh: NOT_SERVING"


async def test_through_the_gateway(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    img2img, _ = await start_server("img2img", fake={"steps": 2})
    mesh, _ = await start_server("mesh")
    async with envoy_running([img2img.port], [mesh.port]) as envoy:
        target = f"127.0.0.1:{envoy.port}"
        health = await kiln("health", "--target", target, cwd=tmp_path)
        image = await kiln("img2img", str(photo), "-p", "x", "--target", target, "-o", "g.png", cwd=tmp_path)
        model = await kiln("mesh", str(photo), "--target", target, "-o", "g.glb", cwd=tmp_path)
    # The gateway has no grpc.health route: `kiln health` falls back to GetInfo readiness.
    assert health.code == 0, health.stderr
    assert health.stdout.splitlines() == ["img2img: SERVING", "mesh: SERVING"]
    assert image.code == 0 and (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    assert model.code == 0 and (tmp_path / "g.glb").read_bytes()[:4] == b"glTF"


async def test_ctrl_c_cancels_the_job_and_exits_130(start_server: StartServer, tmp_path: Path, photo: Path) -> None:
    server, _ = await start_server("img2img", fake={"steps": 200, "step_delay_s": 0.05})
    process = await start_kiln("img2img", str(photo), "-p", "x", "--target", f"127.0.0.1:{server.port}", cwd=tmp_path)
    await until_accepted(process)
    while server.runtime.admission.running == 0:
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()
        while server.runtime.admission.running:
            await asyncio.sleep(0.02)  # the server saw CANCELLED and freed the slot
    assert process.returncode == 130
    assert stderr.decode().strip().endswith("kiln: interrupted; the job was cancelled")
    assert list(server.runtime.store.root.glob("*/*")) == []
    assert not list(tmp_path.glob("photo-kiln*"))


async def test_a_closed_pipe_is_not_an_error(start_server: StartServer, tmp_path: Path) -> None:
    server, _ = await start_server("img2img")
    env = {**os.environ, "KILN_TARGET": f"127.0.0.1:{server.port}"}
    # `kiln info | true`: the reader is gone before the first line is written.
    script = f"'{KILN}' info | true; echo status=${{PIPESTATUS[0]}}"
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert stdout.decode().strip() == "status=0"
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr

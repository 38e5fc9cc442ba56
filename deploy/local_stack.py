"""`make up` / `make down`: run Kiln's servers on this machine and stop them again.

`up` starts the img2img and mesh servers as child processes (logs in .kiln/logs/), waits
until each reports SERVING on grpc.health.v1 (or prints why it is not ready), prints the
addresses, and stays in the foreground; Ctrl-C or `make down` stops every process it
started. Process ids are kept in .kiln/run/ so that `down` works from another terminal.
Configuration comes from the usual KILN_... environment (and .env); ports default to
50051 (img2img) and 50052 (mesh), metrics to 9091 and 9092.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".kiln"
RUN_DIR = STATE / "run"
LOG_DIR = STATE / "logs"
READY_TIMEOUT_S = 600.0  # a first start may download several GB of weights
READINESS_FAILED = 3  # kiln.common.v1.Readiness
STOP_TIMEOUT_S = 40.0


@dataclass(frozen=True)
class Server:
    name: str
    module: str
    service: str
    port: int
    metrics_port: int

    def readiness(self, channel: grpc.Channel) -> tuple[int, str]:
        """GetInfo's readiness and reason: a failed load is reported, not waited for."""
        service = importlib.import_module(f"kiln.{self.name}.v1.{self.name}_service_pb2")
        stubs = importlib.import_module(f"kiln.{self.name}.v1.{self.name}_service_pb2_grpc")
        stub = getattr(stubs, f"{self.service.rsplit('.', 1)[1]}Stub")(channel)
        model = stub.GetInfo(service.GetInfoRequest(), timeout=1).model
        return model.readiness, model.readiness_reason


def servers() -> list[Server]:
    env = os.environ
    return [
        Server(
            "img2img",
            "kiln_img2img",
            "kiln.img2img.v1.Img2ImgProvider",
            int(env.get("KILN_IMG2IMG__SERVER__PORT", "50051")),
            int(env.get("KILN_IMG2IMG__SERVER__METRICS_PORT", "9091")),
        ),
        Server(
            "mesh",
            "kiln_mesh",
            "kiln.mesh.v1.MeshProvider",
            int(env.get("KILN_MESH__SERVER__PORT", "50052")),
            int(env.get("KILN_MESH__SERVER__METRICS_PORT", "9092")),
        ),
    ]


def wait_ready(server: Server, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                print(f"  {server.name}: exited with {process.returncode}; see {LOG_DIR / server.name}.log")
                return False
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=server.service), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return True
                readiness, reason = server.readiness(channel)
                if readiness == READINESS_FAILED:
                    print(f"  {server.name}: NOT_SERVING: {reason}")
                    return False
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.2)
    print(f"  {server.name}: not SERVING after {READY_TIMEOUT_S:.0f} s; see {LOG_DIR / server.name}.log")
    return False


def stop(pids: list[int]) -> None:
    """SIGTERM (the servers drain in-flight jobs), then SIGKILL whatever outlives the timeout."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """True while `pid` runs; an exited process that its parent has not reaped yet is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children as they exit
        if finished:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc: trust kill(0)
    return state != "Z"


def tiny_profile() -> dict[str, str]:
    """Settings that run every model on the generated tiny test models (no downloads)."""
    from kiln_img2img.testing.tiny_models import default_root, ensure_tiny_models
    from kiln_mesh.testing.assets import ensure_tiny_mesh_models

    tiny = ensure_tiny_models(default_root())
    mesh = ensure_tiny_mesh_models()
    return {
        "KILN_OFFLINE": "1",
        "KILN_IMG2IMG__PROVIDER": "local",
        "KILN_IMG2IMG__MODEL__ID": str(tiny.diffusers_dir),
        "KILN_MESH__PROVIDER": "local",
        "KILN_MESH__MODEL__ID": str(mesh.triposr_dir),
        "KILN_MESH__TRIPOSR__REMBG_MODEL_PATH": str(mesh.u2net_path),
    }


def start_gateway(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Envoy in front of both servers (`python -m gateway.kiln_gateway`); returns it and its banner line."""
    gateway_env = {
        **env,
        "KILN_GATEWAY__IMG2IMG_UPSTREAMS": f"127.0.0.1:{servers()[0].port}",
        "KILN_GATEWAY__MESH_UPSTREAMS": f"127.0.0.1:{servers()[1].port}",
    }
    out = log.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.kiln_gateway", "--state-dir", str(STATE / "gateway")],
        cwd=ROOT,
        env=gateway_env,
        stdout=subprocess.PIPE,
        stderr=out,
    )
    assert process.stdout is not None
    banner = process.stdout.readline().decode().strip()  # "gateway on HOST:PORT (admin ...)" once it serves
    return process, banner


def up() -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    if any(RUN_DIR.glob("*.pid")):
        print("a stack seems to be running already; run `make down` first")
        return 1
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    gateway_port = int(env.get("KILN_GATEWAY__PORT", "8080"))
    # Result URIs point at the gateway's download route unless the user chose another base.
    env.setdefault("KILN_STORAGE__PUBLIC_BASE_URL", f"http://127.0.0.1:{gateway_port}/v1/artifacts")
    if env.get("KILN_PROFILE") == "tiny":
        print("KILN_PROFILE=tiny: using the generated tiny models (generating them once if needed)")
        env.update(tiny_profile())
    elif env.get("KILN_PROFILE") == "laptop":
        # The servers apply the profile themselves (kiln_runtime.profiles); this only says so.
        print("KILN_PROFILE=laptop: each model loads on its first request and unloads after 5 idle minutes")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    (RUN_DIR / "launcher.pid").write_text(str(os.getpid()))
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for server in servers():
            log = (LOG_DIR / f"{server.name}.log").open("ab")
            process = subprocess.Popen([sys.executable, "-m", server.module], env=env, stdout=log, stderr=log)
            processes[server.name] = process
            (RUN_DIR / f"{server.name}.pid").write_text(str(process.pid))
        print("Kiln is starting (logs in .kiln/logs/):")
        for server in servers():
            ready = wait_ready(server, processes[server.name])
            state = "SERVING" if ready else "NOT ready"
            print(
                f"  {server.name:8} grpc://127.0.0.1:{server.port}  {state}"
                f"  metrics http://127.0.0.1:{server.metrics_port}/metrics"
            )
        gateway, banner = start_gateway(env, LOG_DIR / "gateway.log")
        processes["gateway"] = gateway
        (RUN_DIR / "gateway.pid").write_text(str(gateway.pid))
        if not banner.startswith("gateway on"):
            # The launcher's last line says why (e.g. no Envoy on a Mac, and how to install one).
            reason = (LOG_DIR / "gateway.log").read_text(errors="replace").strip().splitlines()[-1:]
            print(f"  gateway: did not start ({''.join(reason)}); see {LOG_DIR / 'gateway.log'}")
        else:
            admin = int(env.get("KILN_GATEWAY__ADMIN_PORT", "9901"))
            print(f"  gateway  http://127.0.0.1:{gateway_port}  (gRPC, gRPC-Web, JSON/SSE)")
            print(f"  web page http://127.0.0.1:{gateway_port}/")
            print(f"  envoy admin http://127.0.0.1:{admin}/")
        print(
            f"Try: curl http://127.0.0.1:{gateway_port}/v1/img2img/info   |   Ctrl-C or `make down` stops everything."
        )
        while not stopping and all(p.poll() is None for p in processes.values()):
            time.sleep(0.2)
        for name, process in processes.items():
            if process.poll() is not None and not stopping:
                print(f"{name} exited with {process.returncode}; stopping the rest")
    finally:
        print("stopping...")
        stop([p.pid for p in processes.values()])
        for process in processes.values():
            process.wait()
        for pid_file in RUN_DIR.glob("*.pid"):
            pid_file.unlink()
        print("stopped")
    return 0


def down() -> int:
    pid_files = sorted(RUN_DIR.glob("*.pid")) if RUN_DIR.exists() else []
    if not pid_files:
        print("nothing to stop")
        return 0
    pids = [int(f.read_text()) for f in pid_files]
    stop(pids)
    for pid_file in pid_files:
        pid_file.unlink(missing_ok=True)
    print(f"stopped {len(pids)} process(es)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down"])
    sys.exit(up() if parser.parse_args().command == "up" else down())

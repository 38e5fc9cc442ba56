"""`make up` / `make down`: run Kiln's servers on this machine and stop them again.

`up` starts the img2img and mesh servers as child processes (logs in .kiln/logs/), waits
until each reports SERVING on grpc.health.v1 (or prints why it is not ready), prints the
addresses, and stays in the foreground; Ctrl-C or `make down` stops every process it
started. Process ids are kept in .kiln/run/ so that `down` works from another terminal.
Configuration comes from the usual KILN_... environment (and .env); ports default to
50051 (img2img) and 50052 (mesh), metrics to 9091 and 9092.

Both servers share one URL signing key (.kiln/url-signing-key, made once, mode 0600), so a
signed artifact link works whichever server made it. `KILN_TLS=dev` turns TLS on everywhere:
a development CA and certificates under .kiln/tls/ (deploy/dev_ca.py; made once, then
reused), the gateway on HTTPS, and the servers on mutual TLS that accept only the gateway's
client certificate. The banner says how to trust the CA and which auth mode the gateway runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `deploy.dev_ca` when run as a script
STATE = ROOT / ".kiln"
RUN_DIR = STATE / "run"
LOG_DIR = STATE / "logs"
TLS_DIR = STATE / "tls"
SIGNING_KEY_FILE = STATE / "url-signing-key"
TLS_MODES = ("", "off", "dev")
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


@dataclass(frozen=True)
class DevTls:
    """The development CA and the certificates `KILN_TLS=dev` uses (all under .kiln/tls/)."""

    ca: Path
    gateway_cert: Path  # the HTTPS listener: localhost, 127.0.0.1, ::1
    gateway_key: Path
    servers_cert: Path  # both model servers' gRPC ports (127.0.0.1)
    servers_key: Path
    client_cert: Path  # what the gateway presents to the servers (mutual TLS)
    client_key: Path

    def server_env(self, section: str) -> dict[str, str]:
        prefix = f"KILN_{section.upper()}__SERVER__"
        return {
            f"{prefix}TLS_CERT_FILE": str(self.servers_cert),
            f"{prefix}TLS_KEY_FILE": str(self.servers_key),
            f"{prefix}TLS_CLIENT_CA_FILE": str(self.ca),
        }

    def gateway_env(self) -> dict[str, str]:
        return {
            "KILN_GATEWAY__TLS__CERT_FILE": str(self.gateway_cert),
            "KILN_GATEWAY__TLS__KEY_FILE": str(self.gateway_key),
            "KILN_GATEWAY__TLS__UPSTREAM_CA_FILE": str(self.ca),
            "KILN_GATEWAY__TLS__UPSTREAM_CLIENT_CERT_FILE": str(self.client_cert),
            "KILN_GATEWAY__TLS__UPSTREAM_CLIENT_KEY_FILE": str(self.client_key),
        }

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """What `make up` itself uses to ask the servers whether they serve (it is a client too)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.client_key.read_bytes(),
            certificate_chain=self.client_cert.read_bytes(),
        )


def dev_tls(folder: Path = TLS_DIR) -> DevTls:
    """Create the CA and certificates once; later runs reuse them (a trusted CA stays trusted)."""
    from deploy.dev_ca import CertFiles, issue, make_ca

    ca = make_ca(folder)

    def once(name: str, **options: Any) -> CertFiles:
        files = CertFiles(folder / f"{name}.pem", folder / f"{name}.key")
        return files if files.cert.is_file() and files.key.is_file() else issue(ca, folder, name, **options)

    gateway = once("gateway", hosts=["localhost", "127.0.0.1", "::1"])
    servers = once("servers", hosts=["localhost", "127.0.0.1"])
    client = once("gateway-client", client=True)
    return DevTls(ca.cert, gateway.cert, gateway.key, servers.cert, servers.key, client.cert, client.key)


def signing_key(path: Path = SIGNING_KEY_FILE) -> str:
    """The URL signing key both servers share: made once (random, mode 0600), then read back."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two launchers racing cannot leave two different keys; 0600 from the start.
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32))
    return path.read_text().strip()


def _shown(path: Path) -> Path:
    """A path as the banner shows it: relative to the checkout (where `make up` runs) when inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def trust_hint(tls: DevTls) -> list[str]:
    """How to make browsers and tools trust the development CA (deploy/README.md, "TLS")."""
    ca = _shown(tls.ca)
    return [
        f'  TLS: certificates from the development CA {ca}; to trust it (deploy/README.md, "TLS"):',
        f"    curl --cacert {ca} ...   |   kiln --ca-file {ca} ...",
        f"    Linux: sudo cp {ca} /usr/local/share/ca-certificates/kiln-dev.crt && sudo update-ca-certificates",
        f"    macOS: sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {ca}",
        "    Firefox/Chrome: import it under Settings > Certificates > Authorities",
    ]


def auth_banner(env: dict[str, str], gateway_port: int) -> str:
    """One line on who may use the gateway, so an open stack never looks like a protected one."""
    mode = env.get("KILN_GATEWAY__AUTH__MODE", "none").strip().lower() or "none"
    if mode == "none":
        return (
            f"  auth: none — anyone who can reach 127.0.0.1:{gateway_port} may run jobs; set "
            "KILN_GATEWAY__AUTH__MODE=api_key (and KILN_GATEWAY__AUTH__API_KEYS_FILE) or jwt to require credentials"
        )
    if mode == "api_key":
        keys = env.get("KILN_GATEWAY__AUTH__API_KEYS_FILE", "?")
        return f"  auth: api_key — clients send `authorization: Bearer <key>` (kiln --api-key); keys from {keys}"
    return "  auth: jwt — clients send `authorization: Bearer <token>` (kiln --token)"


def wait_ready(server: Server, process: subprocess.Popen[bytes], tls: DevTls | None = None) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    address = f"127.0.0.1:{server.port}"
    # Under KILN_TLS=dev the servers take only the gateway's certificate, so this check shows it too.
    opened = grpc.insecure_channel(address) if tls is None else grpc.secure_channel(address, tls.channel_credentials())
    with opened as channel:
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


def start_gateway(env: dict[str, str], log: Path, tls: DevTls | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Envoy in front of both servers (`python -m gateway.kiln_gateway`); returns it and its banner line."""
    gateway_env = {
        **env,
        "KILN_GATEWAY__IMG2IMG_UPSTREAMS": f"127.0.0.1:{servers()[0].port}",
        "KILN_GATEWAY__MESH_UPSTREAMS": f"127.0.0.1:{servers()[1].port}",
        **(tls.gateway_env() if tls is not None else {}),
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
    tls_mode = env.get("KILN_TLS", "").strip().lower()
    if tls_mode not in TLS_MODES:
        print(f"KILN_TLS={tls_mode!r} is not a choice: use KILN_TLS=dev (a development CA) or leave it unset")
        return 2
    tls = dev_tls() if tls_mode == "dev" else None
    if tls is not None:
        for section in ("img2img", "mesh"):
            env.update(tls.server_env(section))
    scheme = "https" if tls is not None else "http"
    gateway_port = int(env.get("KILN_GATEWAY__PORT", "8080"))
    # Result URIs point at the gateway's download route unless the user chose another base.
    env.setdefault("KILN_STORAGE__PUBLIC_BASE_URL", f"{scheme}://127.0.0.1:{gateway_port}/v1/artifacts")
    # One key for both servers: a link signed by either is valid on the gateway's one route.
    env.setdefault("KILN_STORAGE__URL_SIGNING_KEY", signing_key())
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
            ready = wait_ready(server, processes[server.name], tls)
            state = "SERVING" if ready else "NOT ready"
            transport = "  (mutual TLS: the gateway's certificate only)" if tls is not None else ""
            print(
                f"  {server.name:8} grpc://127.0.0.1:{server.port}  {state}"
                f"  metrics http://127.0.0.1:{server.metrics_port}/metrics{transport}"
            )
        gateway, banner = start_gateway(env, LOG_DIR / "gateway.log", tls)
        processes["gateway"] = gateway
        (RUN_DIR / "gateway.pid").write_text(str(gateway.pid))
        if not banner.startswith("gateway on"):
            # The launcher's last line says why (e.g. no Envoy on a Mac, and how to install one).
            reason = (LOG_DIR / "gateway.log").read_text(errors="replace").strip().splitlines()[-1:]
            print(f"  gateway: did not start ({''.join(reason)}); see {LOG_DIR / 'gateway.log'}")
        else:
            admin = int(env.get("KILN_GATEWAY__ADMIN_PORT", "9901"))
            print(f"  gateway  {scheme}://127.0.0.1:{gateway_port}  (gRPC, gRPC-Web, JSON/SSE)")
            print(f"  web page {scheme}://127.0.0.1:{gateway_port}/")
            print(f"  envoy admin http://127.0.0.1:{admin}/")
            print(auth_banner(env, gateway_port))
            if tls is not None:
                print("\n".join(trust_hint(tls)))
        curl = "curl " if tls is None else f"curl --cacert {_shown(tls.ca)} "
        print(
            f"Try: {curl}{scheme}://127.0.0.1:{gateway_port}/v1/img2img/info   |   "
            "Ctrl-C or `make down` stops everything."
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

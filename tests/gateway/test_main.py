"""`python -m gateway.kiln_gateway` runs Envoy in the foreground and leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gateway_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KILN_GATEWAY__PORT": "0",
        "KILN_GATEWAY__ADMIN_PORT": "0",
        "KILN_GATEWAY__IMG2IMG_UPSTREAMS": "127.0.0.1:1",
        "KILN_GATEWAY__MESH_UPSTREAMS": "127.0.0.1:2,127.0.0.1:3",
    }


def test_print_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.kiln_gateway", "--print-config"],
        cwd=ROOT,
        env=gateway_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "grpc_json_transcoder" in result.stdout and "port_value: 3" in result.stdout


def test_runs_until_sigterm_and_stops_envoy(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "gateway.kiln_gateway", "--state-dir", str(tmp_path)],
        cwd=ROOT,
        env=gateway_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("gateway on 127.0.0.1:"), line
            port = int(line.split()[2].rpartition(":")[2])
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        pass
    else:
        raise AssertionError("Envoy still listens after the launcher exited")
    assert (tmp_path / "envoy.yaml").exists()

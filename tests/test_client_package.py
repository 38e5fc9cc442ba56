"""The client distribution installs on its own: its dependencies only, no torch, no server code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_client_installs_alone_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT / "clients" / "python")],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    probe = (
        "import importlib.util as u, kiln_client, kiln_client.cli\n"
        "from kiln.img2img.v1 import img2img_service_pb2_grpc\n"
        "from kiln.mesh.v1 import mesh_service_pb2_grpc\n"
        "from google.rpc import error_details_pb2\n"
        "from grpc_status import rpc_status\n"
        "print(sorted(m for m in ('torch', 'kiln_runtime', 'diffusers', 'pydantic') if u.find_spec(m)))"
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # The console script is installed with the package and runs without the server side.
    usage = subprocess.run([str(venv / "bin" / "kiln"), "img2img", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0, usage.stderr
    assert "--prompt" in usage.stdout and "--target" in usage.stdout

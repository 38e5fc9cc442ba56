"""`python -m kiln_mesh`: run the mesh server until SIGTERM."""

from __future__ import annotations

from kiln_mesh.config import MeshSettings
from kiln_mesh.server import create_server
from kiln_runtime.main import run_main


def main() -> None:
    run_main(MeshSettings, create_server, section="mesh")


if __name__ == "__main__":
    main()

"""`python -m kiln_mesh` and `kiln-mesh`: run the mesh server until SIGTERM."""

from __future__ import annotations

from kiln_mesh.server import SPEC

main = SPEC.main

if __name__ == "__main__":
    main()

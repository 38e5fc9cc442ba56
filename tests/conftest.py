"""Process-wide test settings: quiet OpenMP spinning on the shared 2-core machines."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.servers import start_server

__all__ = ["start_server"]

"""pytest plugin for the device check: keep only the tests that skip with "needs a CUDA device".

The CUDA tests live in files with CPU tests (tests/unit/test_mc_torch.py, ...); those run in the main
suite already, and running them again would spend the device check's time budget. A test counts as a
CUDA test when a `skipif` mark on it (or on its module or class) gives that reason, the pattern the
tests use. Load with `-p cuda_only` and this folder on `PYTHONPATH`.
"""

from __future__ import annotations

from typing import Final

import pytest

CUDA_SKIP_REASON: Final = "needs a CUDA device"


def is_cuda_test(item: pytest.Item) -> bool:
    """Whether one of the item's skipif marks skips it for want of CUDA."""
    return any(CUDA_SKIP_REASON in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect everything but the CUDA tests."""
    deselected = [item for item in items if not is_cuda_test(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if is_cuda_test(item)]

"""Giving a model's memory back after its provider dropped its references.

Dropping the last Python reference frees a tensor's storage, but not all of it reaches the
operating system: reference cycles wait for the collector, torch's CUDA and MPS caching
allocators keep freed blocks for reuse, and glibc keeps freed heap below its trim threshold.
`release_memory` does each of those steps, in that order, for the device a model ran on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Callable
from functools import cache
from typing import cast

log = logging.getLogger(__name__)


def release_memory(device: str) -> list[str]:
    """Collect garbage, empty the device's allocator cache and trim the C heap.

    Call it after a provider dropped its model. torch is not imported here: a process that
    never imported it (the fake and vendor providers) has no torch cache to empty.

    Args:
        device: The device the model ran on: "cuda", "mps", "cpu" (or "vendor", treated as cpu).

    Returns:
        The steps that ran, e.g. ["gc", "cuda_empty_cache", "malloc_trim"], for logs and tests.
    """
    steps = ["gc"]
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        if device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
            steps.append("cuda_empty_cache")
        elif device == "mps" and torch.backends.mps.is_available():
            torch.mps.empty_cache()
            steps.append("mps_empty_cache")
    if _malloc_trim() is not None:
        steps.append("malloc_trim")
    return steps


def _malloc_trim() -> int | None:
    """Call `malloc_trim(0)`: glibc returns free heap pages to the OS; None where there is no glibc."""
    trim = _glibc_malloc_trim()
    if trim is None:
        return None
    return int(trim(0))


@cache
def _glibc_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim  # absent on musl
    except (OSError, AttributeError):
        log.debug("malloc_trim is not available (not glibc); freed heap stays with the process")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)

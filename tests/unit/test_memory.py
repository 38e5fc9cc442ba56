"""`release_memory`: garbage collection, the device cache of the device named, glibc's trim."""

from __future__ import annotations

import sys

import pytest
import torch

from kiln_runtime import memory


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record torch's cache calls; CUDA and MPS are reported available (neither exists here)."""
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: seen.append("cuda"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: seen.append("mps"))
    return seen


def test_cuda_empties_the_cuda_cache_only(calls: list[str]) -> None:
    steps = memory.release_memory("cuda")
    assert calls == ["cuda"]
    assert steps[:2] == ["gc", "cuda_empty_cache"]


def test_mps_empties_the_mps_cache_only(calls: list[str]) -> None:
    steps = memory.release_memory("mps")
    assert calls == ["mps"]
    assert steps[:2] == ["gc", "mps_empty_cache"]


@pytest.mark.parametrize("device", ["cpu", "vendor"])
def test_cpu_touches_no_device_cache(calls: list[str], device: str) -> None:
    steps = memory.release_memory(device)
    assert calls == []
    assert "cuda_empty_cache" not in steps and "mps_empty_cache" not in steps


def test_a_missing_device_is_not_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: pytest.fail("called without CUDA"))
    assert "cuda_empty_cache" not in memory.release_memory("cuda")


def test_no_torch_import_when_the_process_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch")
    steps = memory.release_memory("cuda")
    assert "torch" not in sys.modules and steps[0] == "gc"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_malloc_trim_runs_on_linux() -> None:
    assert "malloc_trim" in memory.release_memory("cpu")

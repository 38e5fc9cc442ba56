"""StorageGuard on a real folder: usage, the size estimate, and when a new job is refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc
import pytest

from kiln_runtime.errors import StorageFull
from kiln_runtime.settings import StorageSettings
from kiln_runtime.storage import LocalArtifactStore, new_job_id
from kiln_runtime.storage.budget import RECENT_JOBS, StorageGuard, is_out_of_space
from kiln_runtime.telemetry.metrics import ServiceMetrics

KiB = 1024
MiB = 1024 * KiB


def test_refresh_counts_every_file_under_the_folder(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "outputs")
    guard = StorageGuard(store.root)
    assert guard.refresh() == 0  # the folder does not exist yet
    store.put(new_job_id(), "a.bin", b"x" * 3000, media_type="application/octet-stream")
    store.put(new_job_id(), "b.bin", b"y" * 5000, media_type="application/octet-stream")
    used = guard.refresh()
    meta_bytes = sum(p.stat().st_size for p in store.root.rglob("*.meta.json"))
    assert used == 8000 + meta_bytes
    assert guard.used_bytes == used


def test_free_bytes_of_a_folder_not_made_yet_is_its_disk(tmp_path: Path) -> None:
    guard = StorageGuard(tmp_path / "not" / "made" / "yet")
    stat = os.statvfs(tmp_path)
    # Same filesystem; other writers may move it a little between the two reads.
    assert abs(guard.free_bytes() - stat.f_bavail * stat.f_frsize) < 64 * MiB


def test_estimate_is_the_setting_then_the_largest_recent_job(tmp_path: Path) -> None:
    guard = StorageGuard(tmp_path, expected_job_bytes=16 * MiB)
    assert guard.expected_job_bytes == 16 * MiB
    guard.record_stored("job-a", 2 * MiB)
    assert guard.expected_job_bytes == 2 * MiB  # learned: the setting no longer applies
    guard.record_stored("job-b", 1 * MiB)
    guard.record_stored("job-b", 3 * MiB)  # a job's artifacts add up
    assert guard.expected_job_bytes == 4 * MiB
    guard.record_attempt("job-c", 9 * MiB)  # a failed write teaches its size, without using space
    assert guard.expected_job_bytes == 9 * MiB
    assert guard.used_bytes == 6 * MiB
    for i in range(RECENT_JOBS):
        guard.record_stored(f"later-{i}", 1 * MiB)
    assert guard.expected_job_bytes == 1 * MiB  # the big jobs left the window


def test_budget_refuses_with_room_for_the_jobs_already_admitted(tmp_path: Path) -> None:
    guard = StorageGuard(tmp_path, budget_bytes=10 * MiB, min_free_bytes=0, expected_job_bytes=2 * MiB)
    guard.record_stored("old", 5 * MiB)  # also the estimate from now on: 5 MiB a job
    assert guard.shortfall(pending_jobs=0) is None  # 5 + 5 <= 10
    refusal = guard.shortfall(pending_jobs=1)  # 5 + 2 x 5 > 10
    assert isinstance(refusal, StorageFull)
    assert refusal.code is grpc.StatusCode.RESOURCE_EXHAUSTED and refusal.reason == "STORAGE_FULL"
    assert "KILN_STORAGE__BUDGET_BYTES" in refusal.message and "not started" in refusal.message
    assert refusal.metadata["limit"] == "budget_bytes"
    assert refusal.metadata["needed_bytes"] == str(10 * MiB)
    with pytest.raises(StorageFull):
        guard.check(pending_jobs=1)


def test_floor_refuses_when_the_disk_would_drop_below_it(tmp_path: Path) -> None:
    free = StorageGuard(tmp_path).free_bytes()
    # A floor just above what is free leaves no room; one far below leaves plenty.
    tight = StorageGuard(tmp_path, min_free_bytes=free + 64 * MiB, expected_job_bytes=1)
    refusal = tight.shortfall()
    assert refusal is not None and "KILN_STORAGE__MIN_FREE_BYTES" in refusal.message
    assert refusal.metadata["limit"] == "min_free_bytes"
    assert StorageGuard(tmp_path, min_free_bytes=MiB, expected_job_bytes=MiB).shortfall() is None


def test_without_a_floor_a_job_larger_than_the_free_space_is_refused(tmp_path: Path) -> None:
    free = StorageGuard(tmp_path).free_bytes()
    guard = StorageGuard(tmp_path, min_free_bytes=0, expected_job_bytes=free + 64 * MiB)
    refusal = guard.shortfall()
    assert refusal is not None and "KILN_STORAGE__MIN_FREE_BYTES" not in refusal.message
    assert "free" in refusal.message


def test_settings_accept_human_sizes() -> None:
    settings = StorageSettings(budget_bytes="2GiB", min_free_bytes="512MiB", expected_job_bytes="1.5MB")  # type: ignore[arg-type]
    assert settings.budget_bytes == 2 * 1024 * MiB
    assert settings.min_free_bytes == 512 * MiB
    assert settings.expected_job_bytes == 1_500_000
    assert StorageSettings().budget_bytes is None  # no budget unless asked


def test_metrics_read_usage_and_free_space_at_scrape_time(tmp_path: Path) -> None:
    metrics = ServiceMetrics("img2img")
    guard = StorageGuard(tmp_path)
    guard.export_to(metrics)
    guard.record_stored("job", 1234)
    labels = {"service": "img2img"}
    assert metrics.registry.get_sample_value("kiln_storage_used_bytes", labels) == 1234
    free = metrics.registry.get_sample_value("kiln_storage_free_bytes", labels)
    assert free is not None and free > 0


def test_out_of_space_is_enospc_or_a_quota() -> None:
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not is_out_of_space(ValueError("no"))

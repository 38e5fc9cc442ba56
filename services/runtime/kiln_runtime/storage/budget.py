"""Room for new jobs in a local artifact folder: a byte budget, a free-space floor, and usage.

A model run can take minutes of a GPU, so a job whose result could not be kept is refused
before it runs rather than after. "Could not be kept" is an estimate made at admission:

    needed = expected_job_bytes x (jobs already admitted and not finished + 1)
    refuse when  free - needed < min_free_bytes   (the disk's floor; with no floor, needed > free)
            or   used + needed > budget_bytes     (the folder's budget, when one is set)

`expected_job_bytes` is the largest total a job of this server stored among its last 32 jobs
(a mesh server learns meshes, an img2img server images), and the setting of that name until
the first job is stored. Jobs already admitted count because each of them will store too.

Both limits are admission limits: a job that is already running stores its result whenever the
disk has room, because refusing it then would throw away finished work to protect a margin that
exists for exactly that. The disk itself (ENOSPC) is the only hard limit; `is_out_of_space`
recognises it so the service can fail that one job cleanly.

`free` is read from the filesystem (statvfs) at every check, so it is always current. `used`
is a walk of the folder, too slow for every request: it is recounted every `usage_interval_s`
and after each sweep, and this server's own writes are added as they happen. Writes by other
processes sharing the folder (the other model server under `make up`) are seen at the next
recount.

This module sits beside `LocalArtifactStore` rather than inside the `ArtifactStore` protocol:
an object store has no disk to fill, and every backend would otherwise have to implement it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

from pydantic import ByteSize

from kiln_runtime.errors import StorageFull
from kiln_runtime.settings import StorageSettings
from kiln_runtime.telemetry.metrics import ServiceMetrics

log = logging.getLogger(__name__)

# How many recent jobs the size estimate remembers: enough to cover a mix of output formats
# and resolutions, few enough that a change of workload is learned within minutes.
RECENT_JOBS = 32
_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_out_of_space(error: BaseException) -> bool:
    """Whether `error` is the filesystem saying it is full (ENOSPC) or a quota is (EDQUOT)."""
    return isinstance(error, OSError) and error.errno in _OUT_OF_SPACE


def human_bytes(size: int) -> str:
    """`size` for a person: binary units, one decimal ("256.0MiB")."""
    return ByteSize(max(size, 0)).human_readable(decimal=False)


class StorageGuard:
    """Decides before a job runs whether its results can be stored, and reports usage.

    Thread-safe: `check` runs on the event loop, `record_stored` in worker threads, `refresh`
    in a helper thread.
    """

    def __init__(
        self,
        root: Path,
        *,
        budget_bytes: int | None = None,
        min_free_bytes: int = 0,
        expected_job_bytes: int = 0,
    ) -> None:
        """Guard the artifact folder `root` (it need not exist yet).

        Args:
            root: The local store's folder.
            budget_bytes: Most bytes the folder may hold; None for no budget.
            min_free_bytes: Free space to leave on the folder's filesystem; 0 for no floor.
            expected_job_bytes: Bytes a job is assumed to store until one has been stored.
        """
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.min_free_bytes = min_free_bytes
        self._default_job_bytes = expected_job_bytes
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._used = 0

    @classmethod
    def for_settings(cls, root: Path, settings: StorageSettings) -> StorageGuard:
        """The guard the storage settings describe, with its usage counted once."""
        guard = cls(
            root,
            budget_bytes=settings.budget_bytes,
            min_free_bytes=settings.min_free_bytes,
            expected_job_bytes=settings.expected_job_bytes,
        )
        guard.refresh()
        return guard

    @property
    def used_bytes(self) -> int:
        """Bytes the folder held at the last recount, plus this server's writes since."""
        with self._lock:
            return self._used

    @property
    def expected_job_bytes(self) -> int:
        """What one more job is assumed to store: the largest of the recent jobs, or the setting."""
        with self._lock:
            return max(self._recent.values(), default=self._default_job_bytes)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the folder's filesystem (statvfs)."""
        stat = os.statvfs(_existing(self.root))
        return stat.f_bavail * stat.f_frsize

    def refresh(self) -> int:
        """Recount the bytes under the folder (a walk: call it off the event loop); returns them."""
        used = _folder_bytes(self.root)
        with self._lock:
            self._used = used
        return used

    def record_stored(self, job_id: str, size_bytes: int) -> None:
        """Count an artifact this server just stored, towards usage and its job's size."""
        with self._lock:
            self._used += size_bytes
            self._remember(job_id, size_bytes)

    def record_attempt(self, job_id: str, size_bytes: int) -> None:
        """Learn the size of an artifact that could not be written: the next estimate needs it most."""
        with self._lock:
            self._remember(job_id, size_bytes)

    def shortfall(self, *, pending_jobs: int = 0) -> StorageFull | None:
        """The refusal for one more job, or None when it fits.

        Args:
            pending_jobs: Jobs admitted and not finished; each will store its results too.
        """
        needed = self.expected_job_bytes * (pending_jobs + 1)
        jobs = "this job needs" if pending_jobs == 0 else f"this job and the {pending_jobs} admitted before it need"
        used = self.used_bytes
        try:
            free = self.free_bytes()
        except OSError:  # the write will tell; a failed statvfs must not refuse work
            free = None
        metadata = {"needed_bytes": str(needed), "used_bytes": str(used)}
        if free is not None:
            metadata["free_bytes"] = str(free)
        if free is not None and free - needed < self.min_free_bytes:
            floor = (
                f", and it keeps {human_bytes(self.min_free_bytes)} free (KILN_STORAGE__MIN_FREE_BYTES)"
                if self.min_free_bytes
                else ""
            )
            return StorageFull(
                f"the server's artifact disk is too full: {human_bytes(free)} free{floor}, but {jobs} "
                f"about {human_bytes(needed)}; the job was not started. Retry once old results are cleaned up "
                "or space is freed.",
                metadata={**metadata, "limit": "min_free_bytes", "limit_bytes": str(self.min_free_bytes)},
            )
        if self.budget_bytes is not None and used + needed > self.budget_bytes:
            return StorageFull(
                f"the server's artifact storage budget is used up: {human_bytes(used)} of "
                f"{human_bytes(self.budget_bytes)} (KILN_STORAGE__BUDGET_BYTES) held, and {jobs} about "
                f"{human_bytes(needed)} more; the job was not started. Retry once old results are cleaned up "
                "or space is freed.",
                metadata={**metadata, "limit": "budget_bytes", "limit_bytes": str(self.budget_bytes)},
            )
        return None

    def check(self, *, pending_jobs: int = 0) -> None:
        """Raise `StorageFull` unless one more job's results would fit; cheap, for every request.

        Args:
            pending_jobs: Jobs admitted and not finished; each will store its results too.
        """
        refusal = self.shortfall(pending_jobs=pending_jobs)
        if refusal is not None:
            raise refusal

    def export_to(self, metrics: ServiceMetrics) -> None:
        """Have `metrics` read usage and free space from this guard whenever they are scraped."""
        metrics.storage_used.set_function(lambda: self.used_bytes)
        metrics.storage_free.set_function(self._free_or_nan)

    def _free_or_nan(self) -> float:
        try:
            return float(self.free_bytes())
        except OSError:  # a scrape must not fail because the disk went away; NaN says "unknown"
            return math.nan

    async def watch(self, interval_s: float) -> None:
        """Recount usage every `interval_s` seconds until cancelled (a task of the server)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # a failed count must not end the loop; the next one retries
                log.exception("counting the artifact folder's usage failed")

    def _remember(self, job_id: str, size_bytes: int) -> None:
        # A job may store several artifacts: the estimate is per job, so they add up.
        self._recent[job_id] = self._recent.pop(job_id, 0) + size_bytes
        while len(self._recent) > RECENT_JOBS:
            self._recent.popitem(last=False)


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing ancestor: the store makes its folder at the first write."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def _folder_bytes(root: Path) -> int:
    """The apparent size of every file under `root` (what a budget in bytes means to a person)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # removed meanwhile (cleanup, a failed write)
                continue
    return total

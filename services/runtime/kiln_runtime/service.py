"""The steps every model service shares around its own preprocessing and postprocessing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Generic, TypeVar, cast

from PIL import Image

from kiln_runtime.errors import StorageFull
from kiln_runtime.images import check_image, decode_image
from kiln_runtime.jobs import ProducedArtifact
from kiln_runtime.provider import RunContext
from kiln_runtime.runtime import Runtime
from kiln_runtime.storage.budget import human_bytes, is_out_of_space

log = logging.getLogger(__name__)

ProviderT = TypeVar("ProviderT")


class ModelService(Generic[ProviderT]):
    """Readiness, input decoding, storing and streaming, shared by the img2img and mesh services."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def lease_provider(self) -> AbstractContextManager[ProviderT]:
        """The model for one job; a reload while it runs does not swap it out (worker thread)."""
        return cast(AbstractContextManager[ProviderT], self.runtime.manager.lease())

    async def check_input(self, data: bytes) -> None:
        """Refuse work until the model is ready, then check the image's size, format and pixels.

        Header only, before admission: a request that will be refused for capacity has not
        decoded anything yet (`decode_input` runs after admission).
        """
        await self.runtime.manager.ensure_ready()
        limits = self.runtime.settings.limits
        check_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)

    async def decode_input(self, data: bytes) -> Image.Image:
        """Decode the input image fully, off the loop (truncated files fail here, not in the model)."""
        limits = self.runtime.settings.limits
        return await asyncio.to_thread(
            decode_image, data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )

    def store(
        self, ctx: RunContext, name: str, data: bytes, *, media_type: str, metadata: Mapping[str, str]
    ) -> ProducedArtifact:
        """Store an artifact of a running job, unless the client has gone: then nothing is written.

        A full disk fails this job alone with `StorageFull`, and none of its artifacts stay.
        """
        ctx.check_cancelled()
        guard = self.runtime.storage_guard
        with ctx.phase("store"):
            try:
                stored = self.runtime.store.put(ctx.job_id, name, data, media_type=media_type, metadata=metadata)
            except OSError as err:
                if not is_out_of_space(err):
                    raise
                # The put removed its temp file; earlier artifacts of the job go too: all or nothing.
                self.runtime.store.delete_job(ctx.job_id)
                if guard is not None:
                    guard.record_attempt(ctx.job_id, len(data))
                self.runtime.metrics.count_storage_full(when="write")
                log.warning("job %s: no space left to store %s (%d bytes): %s", ctx.job_id, name, len(data), err)
                raise StorageFull(
                    f"the server ran out of storage space while saving the result ({name}, {human_bytes(len(data))}); "
                    "nothing of this job was kept. Retry once old results are cleaned up or space is freed.",
                    metadata={"limit": "disk", "needed_bytes": str(len(data))},
                ) from err
        if guard is not None:
            guard.record_stored(ctx.job_id, stored.size_bytes)
        return ProducedArtifact(stored, data)

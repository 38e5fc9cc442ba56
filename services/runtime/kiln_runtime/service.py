"""The steps every model service shares around its own preprocessing and postprocessing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Generic, TypeVar, cast

from PIL import Image

from kiln_runtime.images import decode_image
from kiln_runtime.jobs import ProducedArtifact
from kiln_runtime.provider import RunContext
from kiln_runtime.server import Runtime

ProviderT = TypeVar("ProviderT")


class ModelService(Generic[ProviderT]):
    """Readiness, input decoding, storing and streaming, shared by the img2img and mesh services."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def lease_provider(self) -> AbstractContextManager[ProviderT]:
        """The model for one job; a reload while it runs does not swap it out (worker thread)."""
        return cast(AbstractContextManager[ProviderT], self.runtime.manager.lease())

    async def decode_input(self, data: bytes) -> Image.Image:
        """Refuse work until the model is ready, then decode the input image off the loop."""
        await self.runtime.manager.ensure_ready()
        limits = self.runtime.settings.limits
        return await asyncio.to_thread(
            decode_image, data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )

    def store(
        self, ctx: RunContext, name: str, data: bytes, *, media_type: str, metadata: Mapping[str, str]
    ) -> ProducedArtifact:
        """Store an artifact of a running job, unless the client has gone: then nothing is written."""
        ctx.check_cancelled()
        with ctx.phase("store"):
            stored = self.runtime.store.put(ctx.job_id, name, data, media_type=media_type, metadata=metadata)
        return ProducedArtifact(stored, data)

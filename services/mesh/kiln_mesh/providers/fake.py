"""The fake mesh provider: a coloured sphere sized by the settings, no model."""

from __future__ import annotations

import math

from kiln_mesh.mesh import uv_sphere
from kiln_mesh.providers.base import MeshInput, MeshOutput
from kiln_runtime.fake import describe_fake, run_fake_steps, sleep_load
from kiln_runtime.provider import ProviderDescription, RunContext, Stage
from kiln_runtime.settings import FakeProviderSettings

# A sphere vertex costs about 40 bytes in a GLB (position, colour, two triangles' indices).
BYTES_PER_VERTEX = 40


class FakeMeshProvider:
    """Reports `steps` extraction chunks and returns a deterministic sphere of about `output_bytes`."""

    def __init__(self, settings: FakeProviderSettings) -> None:
        self.settings = settings
        # segments = 2 x rings keeps the quads square; vertices ~ segments x rings.
        rings = math.isqrt(max(settings.output_bytes // BYTES_PER_VERTEX // 2, 16))
        self.segments, self.rings = 2 * rings, rings

    def describe(self) -> ProviderDescription:
        return describe_fake("kiln/fake-mesh")

    def load(self) -> None:
        sleep_load(self.settings)

    def warmup(self) -> None:
        pass

    def run(self, request: MeshInput, ctx: RunContext) -> MeshOutput:
        with ctx.phase("extract"):
            run_fake_steps(self.settings, ctx, Stage.EXTRACT)
            mesh = uv_sphere(0.5, self.segments, self.rings)
        return MeshOutput(
            background_removed=request.remove_background == "ALWAYS",
            mesh=mesh,
            vertex_count=mesh.vertex_count,
            face_count=mesh.face_count,
        )

    def close(self) -> None:
        pass

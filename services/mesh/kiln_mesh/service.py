"""Image-to-mesh orchestration: decode, admit, run the provider off the loop, export, store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from kiln_mesh.convert import MeshJob, MeshPayload
from kiln_mesh.export import EXTENSIONS, MEDIA_TYPES, export_mesh
from kiln_mesh.mesh import NATIVE_TO_Y_UP, to_y_up, transform_textured
from kiln_mesh.providers.base import MeshInput, MeshModel, MeshOutput
from kiln_runtime.jobs import JobOutput, RunnerEvent
from kiln_runtime.provider import ProgressUpdate, RunContext, Stage
from kiln_runtime.service import ModelService


def encode_output(output: MeshOutput, job: MeshJob) -> bytes:
    """The requested file in the requested frame; a vendor's file passes through unchanged."""
    if output.encoded is not None:
        return output.encoded
    if output.textured is not None:
        from kiln_mesh.export import export_glb_textured

        textured = output.textured
        if job.frame == "Y_UP":
            textured = transform_textured(textured, NATIVE_TO_Y_UP)
        return export_glb_textured(textured)
    assert output.mesh is not None
    mesh = to_y_up(output.mesh) if job.frame == "Y_UP" else output.mesh
    return export_mesh(mesh, job.output_format)


class MeshService(ModelService[MeshModel]):
    """Validate → preprocess → run → export for one mesh provider."""

    async def generate(
        self, job: MeshJob, *, time_remaining: Callable[[], float | None] = lambda: None
    ) -> AsyncIterator[RunnerEvent]:
        """Stream one job's events; errors before the first event are raised, not yielded."""
        await self.check_input(job.image_bytes)  # header only: a refusal for capacity decodes nothing
        prepared: list[MeshInput] = []

        async def prepare() -> None:  # after admission (JobRunner.run)
            image = await self.decode_input(job.image_bytes)
            prepared.append(
                MeshInput(
                    image=image,
                    remove_background=job.remove_background,
                    foreground_ratio=job.foreground_ratio,
                    mc_resolution=job.mc_resolution,
                    mc_threshold=job.mc_threshold,
                    bake_texture=job.bake_texture,
                    texture_resolution=job.texture_resolution,
                    output_format=job.output_format.name,
                )
            )

        def work(ctx: RunContext) -> JobOutput[MeshPayload]:
            (inputs,) = prepared
            with self.lease_provider() as provider:
                output = provider.run(inputs, ctx)
                description = provider.describe()
            with ctx.phase("export"):
                ctx.report(ProgressUpdate(Stage.EXPORT, 0, 0, 0.99))
                data = encode_output(output, job)
            artifact = self.store(
                ctx,
                f"mesh.{EXTENSIONS[job.output_format]}",
                data,
                media_type=MEDIA_TYPES[job.output_format],
                metadata={"client_request_id": job.client_request_id},
            )
            payload = MeshPayload(job=job, output=output, description=description)
            return JobOutput(payload=payload, artifacts=[artifact])

        async for event in self.runtime.runner.run(
            work, delivery=job.delivery, time_remaining=time_remaining, prepare=prepare
        ):
            yield event

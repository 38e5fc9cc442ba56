"""The mesh clients: blocking `MeshClient` and asyncio `AsyncMeshClient`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from typing import TypedDict, Unpack

from kiln.common.v1 import artifact_pb2
from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as pb_grpc
from kiln_client import _stream
from kiln_client._jobs import AsyncJobsClient, JobsClient
from kiln_client.errors import KilnError


class MeshOptions(TypedDict, total=False):
    """Optional arguments of ``generate`` and ``generate_mesh``; a missing key takes the server's default.

    Attributes:
        output_format: ``"GLB"``, ``"OBJ"``, ``"PLY"`` or a ``MeshFormat`` number; default GLB.
        remove_background: ``"AUTO"`` (keep a real alpha channel), ``"ALWAYS"`` or ``"NEVER"``.
        foreground_ratio: Share of the image the object fills after cropping.
        mc_resolution: Marching-cubes grid resolution per axis.
        mc_threshold: Density threshold of the surface.
        bake_texture: Bake colours into a UV texture (GLB only).
        texture_resolution: Baked texture size in pixels.
        frame: ``"Y_UP"`` or ``"NATIVE"``.
        delivery: ``"INLINE"``, ``"CHUNKED"``, ``"REFERENCE"`` or a number.
        client_request_id: Idempotency key; see `Img2ImgOptions`.
        on_disconnect: ``"WAIT_FOR_WATCHER"``, ``"CANCEL"`` or ``"DETACH"``; see `Img2ImgOptions`.
    """

    output_format: str | int
    remove_background: str | int
    foreground_ratio: float
    mc_resolution: int
    mc_threshold: float
    bake_texture: bool
    texture_resolution: int
    frame: str | int
    delivery: str | int
    client_request_id: str
    on_disconnect: str | int


@dataclass(frozen=True)
class MeshResult:
    """A finished image-to-mesh job.

    Attributes:
        data: The mesh file's bytes, verified against the artifact's SHA-256; None when the
            server delivered it by reference only (``client.download(result.artifact, path)``).
        media_type: For example ``model/gltf-binary``.
        vertex_count: Vertices in the mesh.
        face_count: Triangles in the mesh.
        uri: Where the server stored the file.
        artifact: The file's ``Artifact`` (id, size, SHA-256, URI).
        result: The full ``kiln.mesh.v1.Result`` message.
        job_id: The job (``get_job``, ``watch_job``).
    """

    data: bytes | None
    media_type: str
    vertex_count: int
    face_count: int
    uri: str
    artifact: artifact_pb2.Artifact
    result: pb.Result
    job_id: str = ""


def _request(image: bytes, options: MeshOptions) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        image=image,
        output_format=_stream.enum_value(pb.MeshFormat, "MESH_FORMAT_", options.get("output_format", "GLB")),  # type: ignore[arg-type]
        remove_background=_stream.enum_value(  # type: ignore[arg-type]
            pb.RemoveBackground, "REMOVE_BACKGROUND_", options.get("remove_background")
        ),
        foreground_ratio=options.get("foreground_ratio"),
        mc_resolution=options.get("mc_resolution"),
        mc_threshold=options.get("mc_threshold"),
        bake_texture=options.get("bake_texture", False),
        texture_resolution=options.get("texture_resolution"),
        frame=_stream.enum_value(pb.MeshFrame, "MESH_FRAME_", options.get("frame")),  # type: ignore[arg-type]
        delivery=_stream.delivery(options.get("delivery")),  # type: ignore[arg-type]
        client_request_id=options.get("client_request_id", ""),
        on_disconnect=_stream.disconnect_policy(options.get("on_disconnect")),  # type: ignore[arg-type]
    )


def mesh_result(collected: _stream.Collected) -> MeshResult:
    """The typed result of a collected mesh stream."""
    result = collected.result
    if not isinstance(result, pb.Result):
        raise KilnError("unexpected result type")
    return MeshResult(
        data=collected.data,
        media_type=collected.artifact.media_type,
        vertex_count=result.vertex_count,
        face_count=result.face_count,
        uri=collected.artifact.uri,
        artifact=collected.artifact,
        result=result,
        job_id=collected.job_id,
    )


class MeshClient(JobsClient[pb_grpc.MeshProviderStub, pb.Job, pb.GenerateResponse]):
    """A blocking client for ``kiln.mesh.v1.MeshProvider``.

    Owns a channel and the generated stub; use it as a context manager, or call ``close``.
    Takes the arguments of `kiln_client.ServiceClient` (target, timeout, TLS, API key, retries).

    Example:
        >>> with MeshClient("localhost:8080", timeout=600) as client:
        ...     client.download(client.generate_mesh(png).artifact, "chair.glb")
    """

    _stub_type = pb_grpc.MeshProviderStub
    _messages = pb

    def get_info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        """Describe the model, its readiness, limits and parameter ranges.

        Raises:
            KilnError: The call failed (the subclass names the status code).
        """
        response: pb.GetInfoResponse = self._unary(self._stub.GetInfo, pb.GetInfoRequest(), timeout)
        return response

    def generate(
        self,
        image: bytes,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[MeshOptions],
    ) -> Generator[pb.GenerateResponse]:
        """Run one job and yield its events as they arrive.

        Args:
            image: Encoded PNG, JPEG or WebP input bytes.
            timeout: Deadline in seconds for the whole stream; default the client's.
            retries: Retries before the job exists (its ``accepted`` event); default the client's.
            **options: See `MeshOptions`.

        Yields:
            The ``GenerateResponse`` events (accepted, queued, progress by stage, chunk) up to
            the terminal ``result``, each once and in ``sequence`` order: a stream that breaks
            after ``accepted`` is resumed with ``WatchJob`` from the last event. Stopping the
            iteration cancels the job (``CancelJob``), unless ``on_disconnect`` asks it to
            outlive its stream.

        Raises:
            KilnError: The call failed, or the job ended with an ``error`` event.
            ValueError: An enum name is unknown.
        """
        request = _request(image, options)
        return self._generate(request, timeout, retries)

    def generate_mesh(
        self,
        image: bytes,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[MeshOptions],
    ) -> MeshResult:
        """Run one job to the end and return the mesh file (same arguments as ``generate``).

        Raises:
            ChecksumError: The received bytes do not match the announced SHA-256.
            KilnError: The call or the job failed.
        """
        events = self.generate(image, timeout=timeout, retries=retries, **options)
        return mesh_result(self._with_bytes(_stream.collect(events), options.get("delivery")))


class AsyncMeshClient(AsyncJobsClient[pb_grpc.MeshProviderStub, pb.Job, pb.GenerateResponse]):
    """The asyncio form of `MeshClient`: the same calls, awaited; ``generate`` is an async iterator."""

    _stub_type = pb_grpc.MeshProviderStub
    _messages = pb

    async def get_info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        """See `MeshClient.get_info`."""
        response: pb.GetInfoResponse = await self._unary(self._stub.GetInfo, pb.GetInfoRequest(), timeout)
        return response

    def generate(
        self,
        image: bytes,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[MeshOptions],
    ) -> AsyncGenerator[pb.GenerateResponse]:
        """See `MeshClient.generate`; ``aclose()`` cancels the job (see ``contextlib.aclosing``)."""
        request = _request(image, options)
        return self._generate(request, timeout, retries)

    async def generate_mesh(
        self,
        image: bytes,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[MeshOptions],
    ) -> MeshResult:
        """See `MeshClient.generate_mesh`."""
        events = self.generate(image, timeout=timeout, retries=retries, **options)
        return mesh_result(await self._with_bytes(await _stream.acollect(events), options.get("delivery")))

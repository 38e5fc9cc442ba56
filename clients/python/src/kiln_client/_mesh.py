"""The synchronous mesh client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kiln.common.v1 import artifact_pb2
from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as pb_grpc
from kiln_client import _stream
from kiln_client._base import ServiceClient
from kiln_client.errors import KilnError


@dataclass(frozen=True)
class MeshResult:
    """A finished image-to-mesh job.

    Attributes:
        data: The mesh file's bytes, verified against the artifact's SHA-256; None when the
            server delivered it by reference only (see ``uri``).
        media_type: For example ``model/gltf-binary``.
        vertex_count: Vertices in the mesh.
        face_count: Triangles in the mesh.
        uri: Where the server stored the file.
        result: The full ``kiln.mesh.v1.Result`` message.
    """

    data: bytes | None
    media_type: str
    vertex_count: int
    face_count: int
    uri: str
    result: pb.Result


class MeshClient(ServiceClient[pb_grpc.MeshProviderStub]):
    """A blocking client for ``kiln.mesh.v1.MeshProvider``.

    Owns a channel and the generated stub; use it as a context manager, or call ``close``.

    Args:
        target: Server address, for example ``localhost:50052``.
        timeout: Default deadline in seconds for every call; None waits indefinitely.
        max_message_bytes: Send and receive cap of the channel.
        credentials: TLS credentials; None opens an insecure channel.
        retries: Default number of retries of UNAVAILABLE and RESOURCE_EXHAUSTED before the
            first event of a stream.
    """

    _stub_type = pb_grpc.MeshProviderStub

    def get_info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        """Describe the model, its readiness, limits and parameter ranges.

        Args:
            timeout: Deadline in seconds; default the client's.

        Returns:
            The server's ``GetInfoResponse``.

        Raises:
            KilnError: The call failed (the subclass names the status code).
        """
        response: pb.GetInfoResponse = self._unary(self._stub.GetInfo, pb.GetInfoRequest(), timeout)
        return response

    def generate(
        self,
        image: bytes,
        *,
        output_format: str | int = "GLB",
        remove_background: str | int | None = None,
        foreground_ratio: float | None = None,
        mc_resolution: int | None = None,
        mc_threshold: float | None = None,
        bake_texture: bool = False,
        texture_resolution: int | None = None,
        frame: str | int | None = None,
        delivery: str | int | None = None,
        client_request_id: str = "",
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """Run one job and yield its events as they arrive.

        Args:
            image: Encoded PNG, JPEG or WebP input bytes.
            output_format: ``"GLB"``, ``"OBJ"``, ``"PLY"`` or a ``MeshFormat`` number.
            remove_background: ``"AUTO"``, ``"ALWAYS"``, ``"NEVER"``; None: server default.
            foreground_ratio: Share of the image the object fills after cropping.
            mc_resolution: Marching-cubes grid resolution per axis.
            mc_threshold: Density threshold of the surface.
            bake_texture: Bake colours into a UV texture (GLB only).
            texture_resolution: Baked texture size in pixels.
            frame: ``"Y_UP"`` or ``"NATIVE"``; None: server default.
            delivery: ``"INLINE"``, ``"CHUNKED"``, ``"REFERENCE"``, a number, or None.
            client_request_id: Correlation id echoed in the server's logs.
            timeout: Deadline in seconds for the whole stream; default the client's.
            retries: Retries before the first event; default the client's.

        Yields:
            The ``GenerateResponse`` events up to the terminal ``result``.

        Raises:
            KilnError: The call failed, or the job ended with an ``error`` event.
            ValueError: An enum name is unknown.
        """
        request = pb.GenerateRequest(
            image=image,
            output_format=_stream.enum_value(pb.MeshFormat, "MESH_FORMAT_", output_format),  # type: ignore[arg-type]
            remove_background=_stream.enum_value(  # type: ignore[arg-type]
                pb.RemoveBackground, "REMOVE_BACKGROUND_", remove_background
            ),
            foreground_ratio=foreground_ratio,
            mc_resolution=mc_resolution,
            mc_threshold=mc_threshold,
            bake_texture=bake_texture,
            texture_resolution=texture_resolution,
            frame=_stream.enum_value(pb.MeshFrame, "MESH_FRAME_", frame),  # type: ignore[arg-type]
            delivery=_stream.enum_value(  # type: ignore[arg-type]
                artifact_pb2.ArtifactDelivery, "ARTIFACT_DELIVERY_", delivery
            ),
            client_request_id=client_request_id,
        )
        deadline = timeout if timeout is not None else self._timeout

        def start() -> Iterator[pb.GenerateResponse]:
            return self._stub.Generate(request, timeout=deadline)  # type: ignore[no-any-return]

        return _stream.stream_events(start, retries=self._retries if retries is None else retries)

    def generate_mesh(
        self,
        image: bytes,
        *,
        output_format: str | int = "GLB",
        remove_background: str | int | None = None,
        mc_resolution: int | None = None,
        delivery: str | int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> MeshResult:
        """Run one job to the end and return the mesh file.

        Args:
            image: Encoded input image bytes.
            output_format: ``"GLB"``, ``"OBJ"`` or ``"PLY"``.
            remove_background: ``"AUTO"``, ``"ALWAYS"``, ``"NEVER"``; None: server default.
            mc_resolution: Marching-cubes grid resolution per axis.
            delivery: ``"INLINE"``, ``"CHUNKED"``, ``"REFERENCE"`` or None.
            timeout: Deadline in seconds; default the client's.
            retries: Retries before the first event; default the client's.

        Returns:
            The mesh bytes, checked against their SHA-256, with vertex and face counts.

        Raises:
            ChecksumError: The received bytes do not match the announced SHA-256.
            KilnError: The call or the job failed.
        """
        events = self.generate(
            image,
            output_format=output_format,
            remove_background=remove_background,
            mc_resolution=mc_resolution,
            delivery=delivery,
            timeout=timeout,
            retries=retries,
        )
        collected = _stream.collect(events)
        result = collected.result
        if not isinstance(result, pb.Result):
            raise KilnError("unexpected result type")
        return MeshResult(
            data=collected.data,
            media_type=collected.artifact.media_type,
            vertex_count=result.vertex_count,
            face_count=result.face_count,
            uri=collected.artifact.uri,
            result=result,
        )

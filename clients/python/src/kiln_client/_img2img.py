"""The synchronous img2img client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kiln.common.v1 import artifact_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_client import _stream
from kiln_client._base import ServiceClient
from kiln_client.errors import KilnError


@dataclass(frozen=True)
class Img2ImgResult:
    """A finished img2img job.

    Attributes:
        image: The encoded image bytes, verified against the artifact's SHA-256; None when
            the server delivered it by reference only (see ``uri``).
        media_type: The image's media type, for example ``image/png``.
        seed: The effective seed; send it back to reproduce the image.
        width: Width in pixels.
        height: Height in pixels.
        uri: Where the server stored the image.
        result: The full ``kiln.img2img.v1.Result`` message.
    """

    image: bytes | None
    media_type: str
    seed: int
    width: int
    height: int
    uri: str
    result: pb.Result


class Img2ImgClient(ServiceClient[pb_grpc.Img2ImgProviderStub]):
    """A blocking client for ``kiln.img2img.v1.Img2ImgProvider``.

    Owns a channel and the generated stub; use it as a context manager, or call ``close``.

    Args:
        target: Server address, for example ``localhost:50051``.
        timeout: Default deadline in seconds for every call; None waits indefinitely.
        max_message_bytes: Send and receive cap of the channel.
        credentials: TLS credentials; None opens an insecure channel.
        retries: Default number of retries of UNAVAILABLE and RESOURCE_EXHAUSTED before the
            first event of a stream.
    """

    _stub_type = pb_grpc.Img2ImgProviderStub

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
        prompt: str,
        negative_prompt: str = "",
        strength: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        scheduler: str | int = "EULER",
        output_format: str | int = "PNG",
        preview_every: int = 0,
        delivery: str | int | None = None,
        client_request_id: str = "",
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """Run one job and yield its events as they arrive.

        Args:
            image: Encoded PNG, JPEG or WebP input bytes.
            prompt: What the new image should show.
            negative_prompt: What it should not show.
            strength: How far to move from the input, in (0, 1]; None: server default.
            steps: Denoising steps for strength 1; None: server default.
            guidance: Classifier-free guidance scale; None: server default.
            seed: Random seed; None lets the server draw one.
            scheduler: ``Scheduler`` name without prefix (``"EULER"``, ``"DDIM"``, ...) or number.
            output_format: ``"PNG"``, ``"JPEG"``, ``"WEBP"`` or an ``ImageFormat`` number.
            preview_every: Send a preview every N steps; 0 sends none.
            delivery: ``"INLINE"``, ``"CHUNKED"``, ``"REFERENCE"``, a number, or None for the
                server's default.
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
            prompt=prompt,
            negative_prompt=negative_prompt,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=seed,
            scheduler=_stream.enum_value(pb.Scheduler, "SCHEDULER_", scheduler),  # type: ignore[arg-type]
            output_format=_stream.enum_value(pb.ImageFormat, "IMAGE_FORMAT_", output_format),  # type: ignore[arg-type]
            preview_every_n_steps=preview_every,
            delivery=_stream.enum_value(  # type: ignore[arg-type]
                artifact_pb2.ArtifactDelivery, "ARTIFACT_DELIVERY_", delivery
            ),
            client_request_id=client_request_id,
        )
        deadline = timeout if timeout is not None else self._timeout

        def start() -> Iterator[pb.GenerateResponse]:
            return self._stub.Generate(request, timeout=deadline)  # type: ignore[no-any-return]

        return _stream.stream_events(start, retries=self._retries if retries is None else retries)

    def generate_image(
        self,
        image: bytes,
        *,
        prompt: str,
        negative_prompt: str = "",
        strength: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        scheduler: str | int = "EULER",
        output_format: str | int = "PNG",
        delivery: str | int | None = None,
        client_request_id: str = "",
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Img2ImgResult:
        """Run one job to the end and return the image.

        Takes the same arguments as ``generate`` (without previews).

        Returns:
            The image, checked against its SHA-256, with the effective seed and size.

        Raises:
            ChecksumError: The received bytes do not match the announced SHA-256.
            KilnError: The call or the job failed.
        """
        events = self.generate(
            image,
            prompt=prompt,
            negative_prompt=negative_prompt,
            strength=strength,
            steps=steps,
            guidance=guidance,
            seed=seed,
            scheduler=scheduler,
            output_format=output_format,
            delivery=delivery,
            client_request_id=client_request_id,
            timeout=timeout,
            retries=retries,
        )
        collected = _stream.collect(events)
        result = collected.result
        if not isinstance(result, pb.Result):
            raise KilnError("unexpected result type")
        return Img2ImgResult(
            image=collected.data,
            media_type=collected.artifact.media_type,
            seed=result.parameters.seed,
            width=result.width,
            height=result.height,
            uri=collected.artifact.uri,
            result=result,
        )

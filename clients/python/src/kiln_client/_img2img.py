"""The img2img clients: blocking `Img2ImgClient` and asyncio `AsyncImg2ImgClient`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from typing import TypedDict, Unpack

from kiln.common.v1 import artifact_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_client import _stream
from kiln_client._jobs import AsyncJobsClient, JobsClient
from kiln_client.errors import KilnError


class Img2ImgOptions(TypedDict, total=False):
    """Optional arguments of ``generate`` and ``generate_image``; a missing key takes the server's default.

    Attributes:
        negative_prompt: What the image should not show.
        strength: How far to move from the input, in (0, 1].
        steps: Denoising steps for strength 1 (the server runs about ``steps * strength``).
        guidance: Classifier-free guidance scale.
        seed: Random seed; missing lets the server draw one (the result reports it).
        scheduler: ``Scheduler`` name without prefix (``"EULER"``, ``"DDIM"``, ...) or number;
            default ``"EULER"``.
        output_format: ``"PNG"``, ``"JPEG"``, ``"WEBP"`` or an ``ImageFormat`` number; default PNG.
        preview_every: Send a low-resolution preview every N steps; 0 sends none.
        delivery: ``"INLINE"``, ``"CHUNKED"``, ``"REFERENCE"`` or a number.
        client_request_id: Idempotency key (at most 128 characters), echoed in the server's logs;
            default a new UUID4 per call. The same key with the same request within the servers'
            retention attaches to the existing job (the model runs once).
        on_disconnect: What a dropped stream means for the job: ``"WAIT_FOR_WATCHER"`` (the
            server's default: it runs on for a grace period, 60 s, waiting for a watcher, so the
            client can resume), ``"CANCEL"`` (at once) or ``"DETACH"`` (it runs to the end; read it
            later with ``get_job`` or ``watch_job``).
    """

    negative_prompt: str
    strength: float
    steps: int
    guidance: float
    seed: int
    scheduler: str | int
    output_format: str | int
    preview_every: int
    delivery: str | int
    client_request_id: str
    on_disconnect: str | int


@dataclass(frozen=True)
class Img2ImgResult:
    """A finished img2img job.

    Attributes:
        image: The encoded image bytes, verified against the artifact's SHA-256; None when
            the server delivered it by reference only (``client.download(result.artifact, path)``).
        media_type: The image's media type, for example ``image/png``.
        seed: The effective seed; send it back to reproduce the image.
        width: Width in pixels.
        height: Height in pixels.
        uri: Where the server stored the image.
        artifact: The image's ``Artifact`` (id, size, SHA-256, URI).
        result: The full ``kiln.img2img.v1.Result`` message.
        job_id: The job (``get_job``, ``watch_job``).
    """

    image: bytes | None
    media_type: str
    seed: int
    width: int
    height: int
    uri: str
    artifact: artifact_pb2.Artifact
    result: pb.Result
    job_id: str = ""


def _request(image: bytes, prompt: str, options: Img2ImgOptions) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        image=image,
        prompt=prompt,
        negative_prompt=options.get("negative_prompt", ""),
        strength=options.get("strength"),
        num_inference_steps=options.get("steps"),
        guidance_scale=options.get("guidance"),
        seed=options.get("seed"),
        scheduler=_stream.enum_value(pb.Scheduler, "SCHEDULER_", options.get("scheduler", "EULER")),  # type: ignore[arg-type]
        output_format=_stream.enum_value(pb.ImageFormat, "IMAGE_FORMAT_", options.get("output_format", "PNG")),  # type: ignore[arg-type]
        preview_every_n_steps=options.get("preview_every", 0),
        delivery=_stream.delivery(options.get("delivery")),  # type: ignore[arg-type]
        client_request_id=options.get("client_request_id", ""),
        on_disconnect=_stream.disconnect_policy(options.get("on_disconnect")),  # type: ignore[arg-type]
    )


def img2img_result(collected: _stream.Collected) -> Img2ImgResult:
    """The typed result of a collected img2img stream."""
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
        artifact=collected.artifact,
        result=result,
        job_id=collected.job_id,
    )


class Img2ImgClient(JobsClient[pb_grpc.Img2ImgProviderStub, pb.Job, pb.GenerateResponse]):
    """A blocking client for ``kiln.img2img.v1.Img2ImgProvider``.

    Owns a channel and the generated stub; use it as a context manager, or call ``close``.
    Takes the arguments of `kiln_client.ServiceClient` (target, timeout, TLS, API key, retries).

    Example:
        >>> with Img2ImgClient("localhost:8080", timeout=120) as client:
        ...     result = client.generate_image(png, prompt="a fox, watercolor", seed=7)
    """

    _stub_type = pb_grpc.Img2ImgProviderStub
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
        prompt: str,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[Img2ImgOptions],
    ) -> Generator[pb.GenerateResponse]:
        """Run one job and yield its events as they arrive.

        Args:
            image: Encoded PNG, JPEG or WebP input bytes.
            prompt: What the new image should show.
            timeout: Deadline in seconds for the whole stream; default the client's.
            retries: Retries before the job exists (its ``accepted`` event); default the client's.
            **options: See `Img2ImgOptions`.

        Yields:
            The ``GenerateResponse`` events (accepted, queued, progress, preview, chunk) up to
            the terminal ``result``, each once and in ``sequence`` order: a stream that breaks
            after ``accepted`` is resumed with ``WatchJob`` from the last event. Stopping the
            iteration cancels the job (``CancelJob``), unless ``on_disconnect`` asks it to
            outlive its stream.

        Raises:
            KilnError: The call failed, or the job ended with an ``error`` event.
            ValueError: An enum name is unknown.
        """
        request = _request(image, prompt, options)
        return self._generate(request, timeout, retries)

    def generate_image(
        self,
        image: bytes,
        *,
        prompt: str,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[Img2ImgOptions],
    ) -> Img2ImgResult:
        """Run one job to the end and return the image (same arguments as ``generate``).

        Raises:
            ChecksumError: The received bytes do not match the announced SHA-256.
            KilnError: The call or the job failed.
        """
        events = self.generate(image, prompt=prompt, timeout=timeout, retries=retries, **options)
        return img2img_result(self._with_bytes(_stream.collect(events), options.get("delivery")))


class AsyncImg2ImgClient(AsyncJobsClient[pb_grpc.Img2ImgProviderStub, pb.Job, pb.GenerateResponse]):
    """The asyncio form of `Img2ImgClient`: the same calls, awaited; ``generate`` is an async iterator.

    Example:
        >>> async with AsyncImg2ImgClient("localhost:8080") as client:
        ...     async for event in client.generate(png, prompt="a fox"):
        ...         print(event.WhichOneof("event"))
    """

    _stub_type = pb_grpc.Img2ImgProviderStub
    _messages = pb

    async def get_info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        """See `Img2ImgClient.get_info`."""
        response: pb.GetInfoResponse = await self._unary(self._stub.GetInfo, pb.GetInfoRequest(), timeout)
        return response

    def generate(
        self,
        image: bytes,
        *,
        prompt: str,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[Img2ImgOptions],
    ) -> AsyncGenerator[pb.GenerateResponse]:
        """See `Img2ImgClient.generate`; ``aclose()`` cancels the job (see ``contextlib.aclosing``)."""
        request = _request(image, prompt, options)
        return self._generate(request, timeout, retries)

    async def generate_image(
        self,
        image: bytes,
        *,
        prompt: str,
        timeout: float | None = None,
        retries: int | None = None,
        **options: Unpack[Img2ImgOptions],
    ) -> Img2ImgResult:
        """See `Img2ImgClient.generate_image`."""
        events = self.generate(image, prompt=prompt, timeout=timeout, retries=retries, **options)
        return img2img_result(await self._with_bytes(await _stream.acollect(events), options.get("delivery")))

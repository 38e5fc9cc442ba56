"""The Stable Fast 3D mesh provider: Stability AI's image-to-3D model over its REST API.

One synchronous `POST /v2beta/3d/stable-fast-3d` per job: the image goes up as
multipart/form-data and the 200 answer's body is the finished, textured GLB. There is no job
id and no progress, so progress is coarse (submitted, waiting, received). The blocking `run`
drives the call on the provider's shared HTTP client (kiln_runtime.vendor_http) so that jobs
reuse connections and a cancelled job really closes its connection instead of waiting out a
reconstruction nobody will read. The GLB is passed
through unchanged; only its JSON chunk is read, for the vertex and face counts.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import struct
import time
from typing import Any

import httpx
from PIL import Image

from kiln_mesh.config import StableFast3DSettings
from kiln_mesh.providers.base import MeshInput, MeshOutput
from kiln_runtime import __version__
from kiln_runtime.errors import FieldViolation, InvalidArgument, KilnError, ProviderFailed
from kiln_runtime.provider import ProgressUpdate, ProviderDescription, Reproducibility, RunContext, Stage
from kiln_runtime.vendor_errors import (
    ContentBlockedInput,
    VendorAuth,
    VendorQuota,
    VendorUnavailable,
    vendor_metadata,
)
from kiln_runtime.vendor_http import CallTimedOut, VendorClient, excerpt, guarded

VENDOR = "stability"
MODEL_ID = "stable-fast-3d"
PATH = "/v2beta/3d/stable-fast-3d"
# Stability's documented rate limit is 150 requests per 10 s; a client that exceeds it is
# timed out for 60 s. A 429 without Retry-After therefore means "come back in a minute".
FALLBACK_RETRY_AFTER_S = 60.0
# The only texture sizes the endpoint accepts; anything else would be a vendor 400 after the
# upload, so Kiln refuses first.
TEXTURE_RESOLUTIONS = frozenset({512, 1024, 2048})
# Vendor form fields that Kiln fills from the request, by the Kiln field they come from: a
# vendor 400 naming one of them is the caller's to fix.
KILN_FIELDS = {"image": "image", "foreground_ratio": "foreground_ratio", "texture_resolution": "texture_resolution"}

_GLB_MAGIC = b"glTF"
_GLB_JSON = 0x4E4F534A  # chunk type "JSON", little-endian
_GL_TRIANGLES, _GL_TRIANGLE_STRIP, _GL_TRIANGLE_FAN = 4, 5, 6

logger = logging.getLogger(__name__)


class StableFast3DProvider:
    """Image-to-mesh through Stability's Stable Fast 3D API; implements the mesh provider protocol.

    Parallel slots share one HTTP client (thread-safe by design, see `VendorClient`), so
    jobs reuse connections to Stability. The API key is read only to build the request's
    Authorization header and never appears in logs or error messages.

    Only GLB comes back, with the vendor's texture baked in. Kiln's marching-cubes knobs
    (mc_resolution, mc_threshold) have no vendor equivalent and are ignored, and the API
    does not say whether it segments the subject, so `background_removed` is reported as
    False: Kiln itself removed nothing.
    """

    def __init__(self, settings: StableFast3DSettings) -> None:
        self.settings = settings
        self._url = settings.base_url.rstrip("/") + PATH
        self._http = VendorClient("stable-fast-3d", timeout_s=settings.timeout_s)

    def describe(self) -> ProviderDescription:
        """What runs where: a vendor model, never reproducible (the API takes no seed)."""
        return ProviderDescription(
            kind="stable_fast_3d",
            model_id=MODEL_ID,
            model_revision="",
            device="vendor",
            dtype="",
            library_versions={"kiln": __version__, "httpx": httpx.__version__},
            reproducibility=Reproducibility.NONE,
        )

    def load(self) -> None:
        """Check the configuration without calling Stability, so a server starts during an outage.

        Raises:
            ValueError: No API key is configured, or the base URL is not HTTP(S).
        """
        if len(self.settings.api_key) == 0:
            raise ValueError("the stable_fast_3d provider needs an API key: set KILN_MESH__STABLE_FAST_3D__API_KEY")
        if not self.settings.base_url.startswith(("https://", "http://")):
            raise ValueError("KILN_MESH__STABLE_FAST_3D__BASE_URL must be an http(s) URL")

    def warmup(self) -> None:
        """Nothing to warm: the model runs at the vendor."""

    def close(self) -> None:
        """Close the shared HTTP client and its loop thread; the next run starts them again."""
        self._http.close()

    def run(self, request: MeshInput, ctx: RunContext) -> MeshOutput:
        """Upload the image once and return the vendor's GLB with its vertex and face counts.

        Args:
            request: The validated request; only GLB output is possible.
            ctx: Progress reporting and cancellation of this job.

        Returns:
            The GLB bytes as `encoded`, passed through unchanged.

        Raises:
            InvalidArgument: A format or texture size the API cannot produce (raised before
                any HTTP call), or the vendor rejected a named field or the image's size.
            Cancelled: The job was cancelled; the HTTP call is aborted.
            ContentBlockedInput: Stability's content moderation refused the image.
            VendorQuota, VendorAuth, VendorUnavailable, ProviderFailed: the call failed.
        """
        fields = _form_fields(request)
        with ctx.phase("encode"):
            image = _png_of(request.image)
        ctx.report(ProgressUpdate(Stage.VENDOR_SUBMITTED, 0, 0, 0.1))
        with ctx.phase("vendor"):
            response = self._http.run(lambda client: self._post(client, image, fields, ctx))
        if response.status_code != 200:
            raise _http_error(response, len(image))
        ctx.report(ProgressUpdate(Stage.VENDOR_RECEIVED, 0, 0, 0.9))
        with ctx.phase("decode"):
            vertices, faces = glb_counts(response.content)
        logger.info("stable fast 3d answer: %d bytes, %d vertices, %d faces", len(response.content), vertices, faces)
        return MeshOutput(background_removed=False, encoded=response.content, vertex_count=vertices, face_count=faces)

    async def _post(
        self, client: httpx.AsyncClient, image: bytes, fields: dict[str, str], ctx: RunContext
    ) -> httpx.Response:
        """POST the form once; 429s are not retried here, the client gets RetryInfo instead."""
        waiting = False

        async def trace(event: str, info: dict[str, Any]) -> None:
            nonlocal waiting
            # The body is on the wire: from here on Stability is reconstructing.
            if event.endswith("send_request_body.complete") and not waiting:
                waiting = True
                ctx.report(ProgressUpdate(Stage.VENDOR_WAITING, 0, 0, 0.2))

        headers = {"authorization": f"Bearer {self.settings.api_key.get_secret_value()}"}
        files = {"image": ("image.png", image, "image/png")}
        timeout_s = self.settings.timeout_s
        started = time.perf_counter()
        post = client.post(self._url, data=fields, files=files, headers=headers, extensions={"trace": trace})
        try:
            response = await guarded(post, ctx, timeout_s=timeout_s)
        except (httpx.TimeoutException, CallTimedOut) as exc:
            message = f"Stable Fast 3D did not answer within the {timeout_s:g} s timeout; try again later"
            raise VendorUnavailable(message, metadata=vendor_metadata(VENDOR, vendor_reason="TIMEOUT")) from exc
        except httpx.TransportError as exc:
            reason = type(exc).__name__
            message = f"could not reach Stable Fast 3D ({reason}); try again later"
            raise VendorUnavailable(message, metadata=vendor_metadata(VENDOR, vendor_reason=reason)) from exc
        if not waiting:  # an answer before the upload finished (an early error): keep the sequence whole
            ctx.report(ProgressUpdate(Stage.VENDOR_WAITING, 0, 0, 0.2))
        logger.info("stable fast 3d answered HTTP %d in %.2f s", response.status_code, time.perf_counter() - started)
        return response


def glb_counts(data: bytes) -> tuple[int, int]:
    """Vertex and face counts of a GLB, read from its JSON chunk alone (the binary is not touched).

    Vertices are the POSITION accessors' counts summed over every primitive of every mesh;
    faces are the triangles those primitives draw (indices / 3 for TRIANGLES, n - 2 for strips
    and fans, the vertex count when there are no indices, none for points and lines).

    Args:
        data: The file the vendor returned.

    Returns:
        (vertex count, face count).

    Raises:
        ProviderFailed: The bytes are not a glTF 2.0 binary with a readable JSON chunk.
    """
    if len(data) < 20 or data[:4] != _GLB_MAGIC:
        start = data[:16].decode("latin-1")
        raise ProviderFailed(
            f"Stable Fast 3D answered with something that is not a GLB file ({len(data)} bytes starting {start!r})",
            metadata=vendor_metadata(VENDOR, vendor_reason="NOT_GLB", http_status=200),
        )
    version, length, chunk_length, chunk_type = struct.unpack_from("<IIII", data, 4)
    if version != 2 or length != len(data) or chunk_type != _GLB_JSON or 20 + chunk_length > len(data):
        raise _bad_glb(f"header says version {version}, {length} bytes, first chunk {chunk_type:#x}")
    try:
        document = json.loads(data[20 : 20 + chunk_length])
        accessors = document.get("accessors", [])
        vertices = faces = 0
        for mesh in document.get("meshes", []):
            for primitive in mesh["primitives"]:
                count = int(accessors[primitive["attributes"]["POSITION"]]["count"])
                indexed = "indices" in primitive
                drawn = int(accessors[primitive["indices"]]["count"]) if indexed else count
                vertices += count
                faces += _triangles(int(primitive.get("mode", _GL_TRIANGLES)), drawn)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _bad_glb(f"its JSON chunk cannot be read ({type(exc).__name__}: {exc})") from exc
    return vertices, faces


def _triangles(mode: int, drawn: int) -> int:
    if mode == _GL_TRIANGLES:
        return drawn // 3
    if mode in (_GL_TRIANGLE_STRIP, _GL_TRIANGLE_FAN):
        return max(drawn - 2, 0)
    return 0  # points and lines draw no faces


def _bad_glb(why: str) -> ProviderFailed:
    return ProviderFailed(
        f"Stable Fast 3D returned a malformed GLB file: {why}",
        metadata=vendor_metadata(VENDOR, vendor_reason="BAD_GLB", http_status=200),
    )


def _form_fields(request: MeshInput) -> dict[str, str]:
    """The documented optional form fields Kiln has values for; checked before any upload."""
    violations: list[FieldViolation] = []
    if request.output_format != "GLB":
        violations.append(FieldViolation("output_format", "the stable_fast_3d provider returns GLB only"))
    # Kiln's 0.5-1.0 lies inside the vendor's 0.1-1.0, and both default to 0.85. Rounded
    # because the value arrives as a float32 (0.85 is 0.8500000238...).
    fields = {"foreground_ratio": f"{round(request.foreground_ratio, 4):g}"}
    if request.texture_resolution:  # 0: not asked for, the vendor's default (1024) applies
        if request.texture_resolution in TEXTURE_RESOLUTIONS:
            fields["texture_resolution"] = str(request.texture_resolution)
        else:
            sizes = ", ".join(map(str, sorted(TEXTURE_RESOLUTIONS)))
            violations.append(FieldViolation("texture_resolution", f"the stable_fast_3d provider bakes {sizes} only"))
    if violations:
        raise InvalidArgument(violations)
    return fields


def _png_of(image: Image.Image) -> bytes:
    # PNG keeps an alpha matte, which the vendor can use to find the subject; modes PNG
    # cannot hold (CMYK, YCbCr, float) become RGB(A).
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _http_error(response: httpx.Response, image_bytes: int) -> KilnError:
    """The domain error for a non-200 answer.

    400 and 422 become INVALID_ARGUMENT only when the vendor names a field Kiln sent: that
    is something the caller can change (in practice the image's dimensions, which Kiln does
    not check). A rejection naming nothing Kiln knows is most likely Kiln's own request
    being wrong, so it is a server fault (PROVIDER_FAILED), not the caller's.
    """
    code = response.status_code
    name, errors, error_id = _error_of(response)
    meta = vendor_metadata(VENDOR, vendor_reason=name, http_status=code, vendor_error_id=error_id)
    said = excerpt("; ".join(errors))
    if code == 403 and name == "content_moderation":
        message = "Stable Fast 3D's content moderation refused the input image; use another image"
        return ContentBlockedInput(message, metadata=meta)
    if code in (401, 403):
        return VendorAuth(
            f"Stable Fast 3D rejected the server's API key (HTTP {code} {name}); ask the operator to fix it",
            metadata=meta,
        )
    if code == 413:
        size = f"{image_bytes / 1e6:.1f} MB"
        return InvalidArgument([FieldViolation("image", f"too large for Stable Fast 3D once encoded as PNG ({size})")])
    if code == 429:
        wait = _retry_after(response)
        return VendorQuota(
            f"Stable Fast 3D's rate limit is exhausted; retry in {wait:g} s", retry_after_s=wait, metadata=meta
        )
    if code in (400, 422):
        violations = [
            FieldViolation(KILN_FIELDS[field], f"rejected by Stable Fast 3D: {excerpt(text)}")
            for field, text in map(_split_field, errors)
            if field in KILN_FIELDS
        ]
        if violations:
            return InvalidArgument(violations)
    if code >= 500:
        return VendorUnavailable(f"Stable Fast 3D failed (HTTP {code} {name}); try again later", metadata=meta)
    return ProviderFailed(f"Stable Fast 3D rejected the request (HTTP {code} {name}): {said}", metadata=meta)


def _retry_after(response: httpx.Response) -> float:
    """Retry-After in either form (delta-seconds or an HTTP date), else the documented minute."""
    header = response.headers.get("retry-after", "").strip()
    if header.isdigit():
        return float(header)
    if header:
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return FALLBACK_RETRY_AFTER_S
        if when.tzinfo is not None:
            return max(when.timestamp() - time.time(), 0.0)
    return FALLBACK_RETRY_AFTER_S


def _error_of(response: httpx.Response) -> tuple[str, list[str], str]:
    """(name, errors, id) of Stability's `{"id", "name", "errors": [...]}` body; blanks if not one."""
    try:
        body = response.json()
    except ValueError:
        return "", [], ""
    if not isinstance(body, dict):
        return "", [], ""
    errors = body.get("errors")
    texts = [str(error) for error in errors] if isinstance(errors, list) else []
    return str(body.get("name", "")), texts, str(body.get("id", ""))


def _split_field(error: str) -> tuple[str, str]:
    """Stability prefixes a field's errors with its name ("image: ..."); ("", error) otherwise."""
    field, colon, text = error.partition(":")
    return (field.strip(), text.strip()) if colon and field.strip().isidentifier() else ("", error)

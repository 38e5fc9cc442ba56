"""The Gemini ("Nano Banana") img2img provider: Google's image model over its REST API.

One `generateContent` call per job: the prompt and the input image travel inline, and the
answer's first image part is the result. Gemini reports no progress, so progress is coarse
(submitted, waiting, received). The blocking `run` drives the call on the provider's shared
HTTP client (kiln_runtime.vendor_http) so that jobs reuse connections and a cancelled job
really closes its connection instead of waiting out a generation nobody will read. The seed
is best-effort and the diffusion knobs (strength, steps, guidance, scheduler) have no Gemini
equivalent, so results never reproduce.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import time
from typing import Any
from urllib.parse import quote

import httpx
from PIL import Image

from kiln_img2img.config import GeminiSettings
from kiln_img2img.providers.base import Img2ImgInput, Img2ImgOutput
from kiln_runtime import __version__
from kiln_runtime.errors import FieldViolation, InvalidArgument, KilnError, ProviderFailed
from kiln_runtime.provider import ProgressUpdate, ProviderDescription, Reproducibility, RunContext, Stage
from kiln_runtime.vendor_errors import (
    ContentBlockedInput,
    ContentBlockedOutput,
    NoImageProduced,
    VendorAuth,
    VendorQuota,
    VendorUnavailable,
    vendor_metadata,
)
from kiln_runtime.vendor_http import CallTimedOut, VendorClient, excerpt, guarded

VENDOR = "gemini"
# Gemini takes inline data plus prompt up to about 20 MB per request and refuses more only
# after the whole upload, so Kiln refuses first.
MAX_REQUEST_BYTES = 20_000_000
# Not every 429 says when to come back (a daily quota carries only a Help link); the client
# is then told to wait one per-minute quota window.
FALLBACK_RETRY_AFTER_S = 60.0
# finishReasons meaning Gemini made something and withheld it. Any other finish without an
# image part (STOP with text only, NO_IMAGE, IMAGE_OTHER, OTHER, MAX_TOKENS) is "no image".
OUTPUT_BLOCKED = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "RECITATION",
        "IMAGE_RECITATION",
        "BLOCKLIST",
        "SPII",
    }
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")  # proto3 JSON Duration, e.g. "40s", "0.2s"

logger = logging.getLogger(__name__)


class GeminiImg2ImgProvider:
    """img2img through Gemini's image model; implements the img2img provider protocol.

    Parallel slots share one HTTP client (thread-safe by design, see `VendorClient`), so
    jobs reuse connections to Gemini. The API key is read only to build request headers
    and never appears in logs or error messages.
    """

    def __init__(self, settings: GeminiSettings) -> None:
        self.settings = settings
        self._url = f"{settings.base_url.rstrip('/')}/models/{quote(settings.model, safe='')}:generateContent"
        self._http = VendorClient("gemini", timeout_s=settings.timeout_s)

    def describe(self) -> ProviderDescription:
        return ProviderDescription(
            kind="gemini",
            model_id=self.settings.model,
            model_revision="",
            device="vendor",
            dtype="",
            library_versions={"kiln": __version__, "httpx": httpx.__version__},
            reproducibility=Reproducibility.NONE,
        )

    def load(self) -> None:
        """Check the configuration without calling Gemini, so a server starts during an outage.

        Raises:
            ValueError: No API key is configured, or the base URL is not HTTP(S).
        """
        if len(self.settings.api_key) == 0:
            raise ValueError("the gemini provider needs an API key: set KILN_IMG2IMG__GEMINI__API_KEY")
        if not self.settings.base_url.startswith(("https://", "http://")):
            raise ValueError("KILN_IMG2IMG__GEMINI__BASE_URL must be an http(s) URL")

    def warmup(self) -> None:
        """Nothing to warm: the model runs at the vendor."""

    def close(self) -> None:
        """Close the shared HTTP client and its loop thread; the next run starts them again."""
        self._http.close()

    def run(self, request: Img2ImgInput, ctx: RunContext) -> Img2ImgOutput:
        """Call Gemini once (plus bounded retries on 429) and return its image.

        Raises:
            Cancelled: The job was cancelled; the HTTP call is aborted.
            ContentBlockedInput, ContentBlockedOutput, NoImageProduced: Gemini answered
                without a usable image.
            VendorQuota, VendorAuth, VendorUnavailable, ProviderFailed: the call failed.
        """
        with ctx.phase("encode"):
            body = _request_body(request)
        ctx.report(ProgressUpdate(Stage.VENDOR_SUBMITTED, 0, 0, 0.1))
        with ctx.phase("vendor"):
            answer = self._http.run(lambda client: self._generate(client, body, ctx))
        ctx.report(ProgressUpdate(Stage.VENDOR_RECEIVED, 0, 0, 0.9))
        with ctx.phase("decode"):
            image = _image_from(answer)
        return Img2ImgOutput(image=image, steps_run=0, prompt_truncated=False)

    async def _generate(self, client: httpx.AsyncClient, body: bytes, ctx: RunContext) -> dict[str, Any]:
        """POST, retrying a 429 whose delay is short enough; returns the 200 answer."""
        retries = 0
        while True:
            response = await self._post(client, body, ctx)
            if response.status_code != 429:
                return _answer_of(response)
            delay = _retry_delay(response)
            if delay is None or delay > self.settings.max_retry_delay_s or retries == self.settings.max_retries:
                raise _quota_error(response, delay)
            retries += 1
            logger.warning("gemini quota hit (429); retry %d of %d in %g s", retries, self.settings.max_retries, delay)
            await guarded(asyncio.sleep(delay), ctx)

    async def _post(self, client: httpx.AsyncClient, body: bytes, ctx: RunContext) -> httpx.Response:
        waiting = False

        async def trace(event: str, info: dict[str, Any]) -> None:
            nonlocal waiting
            # The body is on the wire: from here on Gemini is generating.
            if event.endswith("send_request_body.complete") and not waiting:
                waiting = True
                ctx.report(ProgressUpdate(Stage.VENDOR_WAITING, 0, 0, 0.2))

        headers = {"x-goog-api-key": self.settings.api_key.get_secret_value(), "content-type": "application/json"}
        started = time.perf_counter()
        post = client.post(self._url, content=body, headers=headers, extensions={"trace": trace})
        try:
            response = await guarded(post, ctx, timeout_s=self.settings.timeout_s)
        except (httpx.TimeoutException, CallTimedOut) as exc:
            message = f"Gemini did not answer within the {self.settings.timeout_s:g} s timeout; try again later"
            raise VendorUnavailable(message, metadata=vendor_metadata(VENDOR, vendor_reason="TIMEOUT")) from exc
        except httpx.TransportError as exc:
            reason = type(exc).__name__
            message = f"could not reach Gemini ({reason}); try again later"
            raise VendorUnavailable(message, metadata=vendor_metadata(VENDOR, vendor_reason=reason)) from exc
        if not waiting:  # an answer before the upload finished (an early error): keep the sequence whole
            ctx.report(ProgressUpdate(Stage.VENDOR_WAITING, 0, 0, 0.2))
        logger.info("gemini answered HTTP %d in %.2f s", response.status_code, time.perf_counter() - started)
        return response


def _request_body(request: Img2ImgInput) -> bytes:
    buffer = io.BytesIO()
    request.image.save(buffer, format="PNG")
    text = request.prompt
    if request.negative_prompt.strip():
        # Gemini has no negative prompt; an instruction is the closest it understands.
        text = f"{text}\n\nAvoid: {request.negative_prompt}"
    image_part = {"inline_data": {"mime_type": "image/png", "data": base64.b64encode(buffer.getvalue()).decode()}}
    payload = {
        "contents": [{"role": "user", "parts": [{"text": text}, image_part]}],
        # Gemini's seed is an int32 (best-effort for image models); Kiln's is a uint32.
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "seed": request.seed % 2**31},
    }
    body = json.dumps(payload).encode()
    if len(body) > MAX_REQUEST_BYTES:
        size = f"{len(body) / 1e6:.1f} MB"
        raise InvalidArgument([FieldViolation("image", f"too large for Gemini once encoded ({size} > 20 MB)")])
    return body


def _answer_of(response: httpx.Response) -> dict[str, Any]:
    """The decoded 200 answer; any other status becomes the matching domain error."""
    if response.status_code != 200:
        raise _http_error(response)
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ProviderFailed("Gemini answered with a body that is not a JSON object", metadata=_meta(200))
    _log_answer(answer)
    return answer


def _http_error(response: httpx.Response) -> KilnError:
    code = response.status_code
    error = _error_of(response)
    status = str(error.get("status", ""))
    info_reason = str(_detail(error, "ErrorInfo").get("reason", ""))
    meta = _meta(code, info_reason or status, vendor_status=status)
    if code in (401, 403) or info_reason == "API_KEY_INVALID":
        message = (
            f"Gemini rejected the server's API key (HTTP {code} {info_reason or status}); ask the operator to fix it"
        )
        return VendorAuth(message, metadata=meta)
    if code >= 500:
        return VendorUnavailable(f"Gemini failed (HTTP {code} {status}); try again later", metadata=meta)
    vendor_message = excerpt(str(error.get("message", "")))
    return ProviderFailed(f"Gemini rejected the request (HTTP {code} {status}): {vendor_message}", metadata=meta)


def _retry_delay(response: httpx.Response) -> float | None:
    """The vendor's wait from RetryInfo, else from a Retry-After header (seconds form)."""
    match = _DURATION.match(str(_detail(_error_of(response), "RetryInfo").get("retryDelay", "")))
    if match:
        return float(match[1])
    header = response.headers.get("retry-after", "").strip()
    return float(header) if header.isdigit() else None


def _quota_error(response: httpx.Response, delay: float | None) -> VendorQuota:
    error = _error_of(response)
    violations = _detail(error, "QuotaFailure").get("violations")
    first = violations[0] if isinstance(violations, list) and violations and isinstance(violations[0], dict) else {}
    wait = FALLBACK_RETRY_AFTER_S if delay is None else delay
    meta = _meta(429, str(error.get("status") or "RESOURCE_EXHAUSTED"), quota_id=str(first.get("quotaId", "")))
    return VendorQuota(
        f"Gemini's quota or rate limit is exhausted; retry in {wait:g} s", retry_after_s=wait, metadata=meta
    )


def _image_from(answer: dict[str, Any]) -> Image.Image:
    """The first final image of the first candidate, or the domain error saying why none."""
    block = _obj(answer.get("promptFeedback")).get("blockReason")
    if block:
        message = f"Gemini refused the prompt (blockReason {block}); rephrase it or use another input image"
        raise ContentBlockedInput(message, metadata=_meta(200, str(block)))
    candidates = answer.get("candidates")
    candidate = _obj(candidates[0]) if isinstance(candidates, list) and candidates else {}
    finish = str(candidate.get("finishReason", ""))
    if finish in OUTPUT_BLOCKED:
        message = f"Gemini withheld the generated image (finishReason {finish}); change the prompt or the input image"
        raise ContentBlockedOutput(message, metadata=_meta(200, finish))
    parts = _obj(candidate.get("content")).get("parts")
    texts: list[str] = []
    for part in parts if isinstance(parts, list) else []:
        part = _obj(part)
        if part.get("thought"):
            continue  # a thinking model's draft, not the answer
        inline = _obj(part.get("inlineData") or part.get("inline_data"))
        if inline.get("data"):
            return _decode_image(inline["data"], finish)
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
    said = excerpt(" ".join(texts))
    message = f"Gemini answered without an image (finishReason {finish or 'none'})"
    message += f': "{said}"' if said else ""
    raise NoImageProduced(
        f"{message}; rephrase the prompt as an instruction to change the image",
        metadata=_meta(200, finish or ("NO_CANDIDATES" if not candidate else "")),
    )


def _decode_image(data: object, finish: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(str(data), validate=True))) as image:
            return image.convert("RGB")
    except (binascii.Error, ValueError, OSError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ProviderFailed("Gemini returned an image that could not be decoded", metadata=_meta(200, finish)) from exc


def _log_answer(answer: dict[str, Any]) -> None:
    usage = _obj(answer.get("usageMetadata"))
    logger.info(
        "gemini answer: modelVersion=%s promptTokens=%s candidatesTokens=%s",
        answer.get("modelVersion", ""),
        usage.get("promptTokenCount", ""),
        usage.get("candidatesTokenCount", ""),
    )


def _error_of(response: httpx.Response) -> dict[str, Any]:
    """The `error` object of a google.rpc.Status JSON body; {} when the body is not one."""
    try:
        return _obj(_obj(response.json()).get("error"))
    except ValueError:
        return {}


def _detail(error: dict[str, Any], kind: str) -> dict[str, Any]:
    """The first `google.rpc.<kind>` entry of `error.details`, or {}."""
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(f"google.rpc.{kind}"):
            return detail
    return {}


def _meta(http_status: int, vendor_reason: str = "", **extra: str) -> dict[str, str]:
    return vendor_metadata(VENDOR, vendor_reason=vendor_reason, http_status=http_status, **extra)


def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}

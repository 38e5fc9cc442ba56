"""A local stand-in for Gemini's `generateContent` REST API, speaking its documented JSON.

It serves `POST /v1beta/models/{model}:generateContent` on a free loopback port, checks the
`x-goog-api-key` header, parses the request as strictly as the real API (unknown fields,
bad base64 or a non-image are 400 INVALID_ARGUMENT) and answers with the outcome the test
chose in `scenario`. Answers are camelCase, as Gemini's are; errors are google.rpc.Status
JSON (AIP-193). Every request is recorded for assertions.

Usage:
    with GeminiStandIn(api_key="k") as gemini:
        gemini.scenario = "quota_once"
        settings = GeminiSettings(api_key="k", base_url=gemini.base_url)
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from PIL import Image, ImageOps

DEFAULT_MODEL = "gemini-2.5-flash-image"
SCENARIOS = frozenset(
    {
        "success",  # a text part then an inlineData PNG (the inverted input image)
        "image_first",  # the image part before the text part (the order is not guaranteed)
        "quota",  # 429 RESOURCE_EXHAUSTED with RetryInfo `retry_delay`, every time
        "quota_once",  # one such 429, then success
        "quota_no_retry_info",  # 429 carrying only QuotaFailure and Help, no RetryInfo
        "internal",  # 500 INTERNAL
        "unavailable",  # 503 UNAVAILABLE ("The model is overloaded")
        "blocked_prompt",  # 200 with promptFeedback.blockReason `block_reason`, no candidates
        "blocked_output",  # 200 with candidates[0].finishReason `finish_reason`, no image
        "text_only",  # 200, finishReason STOP, only a text part (`model_text`)
        "slow",  # waits `slow_s` (ends early if the client hangs up), then success
    }
)
_PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:?]+):generateContent(?:\?(?P<query>.*))?$")
_TOP_FIELDS = {"contents", "generationConfig", "generation_config", "safetySettings", "safety_settings"}
_CONFIG_FIELDS = {
    "responseModalities",
    "response_modalities",
    "seed",
    "temperature",
    "candidateCount",
    "candidate_count",
    "imageConfig",
    "image_config",
}
_IMAGE_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


class BadRequest(Exception):
    """The request body is not what generateContent accepts; becomes a 400."""


@dataclass
class RecordedRequest:
    """One request as the stand-in received it."""

    path: str
    headers: dict[str, str]  # lower-cased names
    raw_body: bytes
    received_at: float  # time.monotonic()
    body: dict[str, Any] | None = None
    prompt: str = ""  # all text parts, joined with newlines
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (mime type, bytes)


class GeminiStandIn:
    """The stand-in server; set the outcome attributes before (or between) calls."""

    def __init__(self, *, api_key: str = "standin-key", model: str = DEFAULT_MODEL) -> None:
        self.api_key = api_key
        self.model = model
        self.scenario = "success"
        self.retry_delay = "1s"
        self.block_reason = "SAFETY"
        self.finish_reason = "IMAGE_SAFETY"
        self.model_text = "Here is the edited image."
        self.slow_s = 5.0
        self.requests: list[RecordedRequest] = []
        self.connections = 0  # TCP connections accepted: fewer than requests means keep-alive reuse
        self.disconnected = threading.Event()  # a slow answer's client hung up before it was sent
        self.hang_ups = 0  # how many times that happened
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The API root to put in `GeminiSettings.base_url`."""
        assert self._server is not None, "start the stand-in first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1beta"

    def start(self) -> GeminiStandIn:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.standin = self
        # A short poll interval keeps `shutdown` (and so each test's teardown) quick.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, name="gemini-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> GeminiStandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def record(self, request: RecordedRequest) -> int:
        """Store a request; returns how many came before it (for "quota_once")."""
        with self._lock:
            self.requests.append(request)
            return len(self.requests) - 1

    def answer(self, request: RecordedRequest, index: int, handler: _Handler) -> tuple[int, dict[str, Any]]:
        """The (HTTP status, JSON body) the chosen scenario gives to a valid request."""
        scenario = self.scenario
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}")
        if scenario == "quota" or (scenario == "quota_once" and index == 0):
            return 429, _quota_error(self.model, self.retry_delay)
        if scenario == "quota_no_retry_info":
            return 429, _quota_error(self.model, None)
        if scenario == "internal":
            return 500, _status(500, "INTERNAL", "An internal error has occurred. Please retry or report it.")
        if scenario == "unavailable":
            return 503, _status(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if scenario == "blocked_prompt":
            return 200, {"promptFeedback": {"blockReason": self.block_reason}, **self._usage()}
        if scenario == "blocked_output":
            return 200, {"candidates": [{"finishReason": self.finish_reason, "index": 0}], **self._usage()}
        if scenario == "text_only":
            return 200, self._candidate([{"text": self.model_text}])
        if scenario == "slow" and not handler.wait_unless_hung_up(self.slow_s):
            with self._lock:
                self.hang_ups += 1
            self.disconnected.set()
            return 0, {}
        text = {"text": self.model_text}
        image = {"inlineData": {"mimeType": "image/png", "data": _edited_png(request.images[0][1])}}
        return 200, self._candidate([image, text] if scenario == "image_first" else [text, image])

    def _candidate(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        content = {"role": "model", "parts": parts}
        return {"candidates": [{"content": content, "finishReason": "STOP", "index": 0}], **self._usage()}

    def _usage(self) -> dict[str, Any]:
        usage = {"promptTokenCount": 17, "candidatesTokenCount": 1306, "totalTokenCount": 1323}
        return {"usageMetadata": usage, "modelVersion": self.model, "responseId": "standin-response"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: GeminiStandIn

    def process_request(self, request: Any, client_address: Any) -> None:
        self.standin.connections += 1  # the serving thread accepts one at a time: no lock needed
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-answer are part of the tests, not failures


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Google's front end
    # Headers and body go out in separate writes: with Nagle on, a reused connection waits for
    # the client's delayed ACK (about 40 ms) before the body, which real front ends do not do.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        status, payload = self._route()
        if status:  # 0: the client hung up, nothing to send
            self._send(status, payload)

    def _route(self) -> tuple[int, dict[str, Any]]:
        standin = self.server.standin
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = RecordedRequest(self.path, headers, raw, time.monotonic())
        index = standin.record(request)
        match = _PATH.match(self.path)
        if match is None:
            return 404, _status(404, "NOT_FOUND", f"The requested URL {self.path} was not found.")
        query_key = re.search(r"(?:^|&)key=([^&]*)", match["query"] or "")
        key = headers.get("x-goog-api-key") or (query_key[1] if query_key else "")
        if not key:
            return 403, _status(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
        if key != standin.api_key:
            return 400, _key_invalid()
        if match["model"] != standin.model:
            return 404, _status(404, "NOT_FOUND", f"models/{match['model']} is not found for API version v1beta")
        if not headers.get("content-type", "").startswith("application/json"):
            return 400, _status(400, "INVALID_ARGUMENT", "Invalid JSON payload: wrong content type.")
        try:
            _parse(raw, request)
        except BadRequest as exc:
            return 400, _status(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")
        return standin.answer(request, index, self)

    def wait_unless_hung_up(self, seconds: float) -> bool:
        """Sleep `seconds` while watching the socket; False as soon as the client closes it."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.02))
            if readable:
                try:
                    peeked = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    peeked = b""
                if not peeked:
                    self.close_connection = True
                    return False
                time.sleep(0.02)  # a pipelined request is waiting; not a hang-up
        return True

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json; charset=UTF-8")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


def _parse(raw: bytes, request: RecordedRequest) -> None:
    """Check the body the way generateContent does and fill in the recorded fields."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    request.body = body
    _no_unknown(body, _TOP_FIELDS, "")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise BadRequest("contents is required and must be a non-empty list")
    texts: list[str] = []
    for content in contents:
        if not isinstance(content, dict):
            raise BadRequest("each content must be an object")
        _no_unknown(content, {"role", "parts"}, "contents[].")
        if content.get("role", "user") not in ("user", "model"):
            raise BadRequest(f"contents[].role must be user or model, got {content.get('role')!r}")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise BadRequest("contents[].parts is required and must be a non-empty list")
        for part in parts:
            _parse_part(part, texts, request.images)
    request.prompt = "\n".join(texts)
    config = body.get("generationConfig", body.get("generation_config", {}))
    if not isinstance(config, dict):
        raise BadRequest("generationConfig must be an object")
    _no_unknown(config, _CONFIG_FIELDS, "generationConfig.")
    modalities = config.get("responseModalities", config.get("response_modalities", []))
    if not isinstance(modalities, list):
        raise BadRequest("generationConfig.responseModalities must be a list")
    for modality in modalities:
        if modality not in ("TEXT", "IMAGE"):
            raise BadRequest(f"Invalid value at 'generation_config.response_modalities': {modality!r}")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**31) <= seed < 2**31:
        raise BadRequest(f"Invalid value at 'generation_config.seed' (TYPE_INT32), {seed!r}")


def _parse_part(part: object, texts: list[str], images: list[tuple[str, bytes]]) -> None:
    if not isinstance(part, dict) or len(part) != 1:
        raise BadRequest("each part must hold exactly one of text, inline_data")
    if "text" in part:
        if not isinstance(part["text"], str):
            raise BadRequest("parts[].text must be a string")
        texts.append(part["text"])
        return
    inline = part.get("inline_data", part.get("inlineData"))
    if not isinstance(inline, dict):
        raise BadRequest(f"Unknown name {next(iter(part))!r} at 'contents[].parts[]': Cannot find field.")
    _no_unknown(inline, {"mime_type", "mimeType", "data"}, "inline_data.")
    mime = inline.get("mime_type", inline.get("mimeType"))
    if mime not in _IMAGE_MIME:
        raise BadRequest(f"Unsupported MIME type: {mime!r}")
    try:
        data = base64.b64decode(str(inline.get("data", "")), validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            found = image.format
    except (binascii.Error, OSError) as exc:
        raise BadRequest(f"inline_data.data is not a base64 image: {exc}") from None
    if found != _IMAGE_MIME[mime]:
        raise BadRequest(f"inline_data is {found}, not {mime}")
    images.append((mime, data))


def _no_unknown(obj: dict[str, Any], known: set[str], where: str) -> None:
    for name in obj:
        if name not in known:
            raise BadRequest(f"Unknown name {name!r} at '{where}': Cannot find field.")


def _edited_png(input_png: bytes) -> str:
    """A real, deterministic edit of the input: its colour negative, as base64 PNG."""
    with Image.open(io.BytesIO(input_png)) as image:
        edited = ImageOps.invert(image.convert("RGB"))
    buffer = io.BytesIO()
    edited.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _status(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def _key_invalid() -> dict[str, Any]:
    message = "API key not valid. Please pass a valid API key."
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
    localized = {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message}
    return _status(400, "INVALID_ARGUMENT", message, [info, localized])


def _quota_error(model: str, retry_delay: str | None) -> dict[str, Any]:
    violation = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        "quotaDimensions": {"location": "global", "model": model},
        "quotaValue": "10",
    }
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]},
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
    ]
    message = "You exceeded your current quota, please check your plan and billing details."
    if retry_delay is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
        message += f" Please retry in {retry_delay}."
    return _status(429, "RESOURCE_EXHAUSTED", message, details)

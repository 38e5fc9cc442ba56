"""A local stand-in for Stability AI's Stable Fast 3D REST API (`POST /v2beta/3d/stable-fast-3d`).

It serves the endpoint on a free loopback port, checks the bearer key, parses the
multipart/form-data body as strictly as the documented schema (the `image` file part is
required and must be an image; `texture_resolution`, `foreground_ratio`, `remesh` and
`vertex_count` must be in range; anything else is a 400) and answers with the outcome the
test chose in `scenario`. Success is a real GLB (`model/gltf-binary`); errors are
Stability's `{"id", "name", "errors": [...]}` JSON. Every request is recorded.

Usage:
    with StableFast3DStandIn(api_key="k") as sf3d:
        sf3d.scenario = "content_moderation"
        settings = StableFast3DSettings(api_key="k", base_url=sf3d.base_url)
"""

from __future__ import annotations

import functools
import io
import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from PIL import Image

from kiln_mesh.export import export_glb
from kiln_mesh.mesh import uv_sphere

PATH = "/v2beta/3d/stable-fast-3d"
SCENARIOS = frozenset(
    {
        "success",  # 200, model/gltf-binary: a small UV sphere
        "bad_request",  # 400 bad_request naming `bad_field`
        "content_moderation",  # 403 content_moderation
        "too_large",  # 413 payload_too_large
        "rate_limited",  # 429 rate_limit_exceeded, with a Retry-After header when `retry_after` is set
        "internal",  # 500 internal_error
        "not_glb",  # 200 whose body is not a GLB (a broken gateway answering HTML)
        "slow",  # waits `slow_s` (ends early if the client hangs up), then success
    }
)
_FIELDS = {"image", "texture_resolution", "foreground_ratio", "remesh", "vertex_count"}
_IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


class BadRequest(Exception):
    """The form is not what the endpoint accepts; becomes a 400 whose error is the message."""


@dataclass
class RecordedRequest:
    """One request as the stand-in received it."""

    path: str
    headers: dict[str, str]  # lower-cased names
    raw_body: bytes
    received_at: float  # time.monotonic()
    fields: dict[str, str] = field(default_factory=dict)  # the non-file form fields
    image: bytes = b""
    image_content_type: str = ""
    image_filename: str = ""


@functools.cache
def sphere_glb() -> bytes:
    """The success answer: a real, small GLB (114 vertices, 224 faces)."""
    return export_glb(uv_sphere(0.5, 16, 8))


class StableFast3DStandIn:
    """The stand-in server; set the outcome attributes before (or between) calls."""

    def __init__(self, *, api_key: str = "standin-key") -> None:
        self.api_key = api_key
        self.scenario = "success"
        self.glb = sphere_glb()
        self.bad_field = "image"
        self.retry_after: str | None = None
        self.slow_s = 5.0
        self.requests: list[RecordedRequest] = []
        self.connections = 0  # TCP connections accepted: fewer than requests means keep-alive reuse
        self.disconnected = threading.Event()  # a slow answer's client hung up before it was sent
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The API root to put in `StableFast3DSettings.base_url`."""
        assert self._server is not None, "start the stand-in first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StableFast3DStandIn:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.standin = self
        # A short poll interval keeps `shutdown` (and so each test's teardown) quick.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, name="sf3d-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StableFast3DStandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def answer(self, handler: _Handler) -> tuple[int, dict[str, str], bytes]:
        """The (HTTP status, extra headers, body) the chosen scenario gives to a valid request."""
        scenario = self.scenario
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}")
        if scenario == "bad_request":
            return _error(400, "bad_request", f"{self.bad_field}: is invalid for this request")
        if scenario == "content_moderation":
            message = (
                "Your request was flagged by our content moderation system, as a result your request was denied"
                " and you were not charged."
            )
            return _error(403, "content_moderation", message)
        if scenario == "too_large":
            return _error(413, "payload_too_large", "body: payloads cannot be larger than 10MiB in size")
        if scenario == "rate_limited":
            message = (
                "You have exceeded the rate limit of 150 requests within a 10 second period, and have been timed"
                " out for 60 seconds."
            )
            status, headers, body = _error(429, "rate_limit_exceeded", message)
            if self.retry_after is not None:
                headers["retry-after"] = self.retry_after
            return status, headers, body
        if scenario == "internal":
            return _error(500, "internal_error", "An unexpected server error has occurred, please try again later.")
        if scenario == "not_glb":
            return 200, {"content-type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"
        if scenario == "slow" and not handler.wait_unless_hung_up(self.slow_s):
            self.disconnected.set()
            return 0, {}, b""
        return 200, {"content-type": "model/gltf-binary"}, self.glb


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: StableFast3DStandIn

    def process_request(self, request: Any, client_address: Any) -> None:
        self.standin.connections += 1  # the serving thread accepts one at a time: no lock needed
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-answer are part of the tests, not failures


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Stability's front end
    # Headers and body go out in separate writes: with Nagle on, a reused connection waits for
    # the client's delayed ACK (about 40 ms) before the body, which real front ends do not do.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        status, headers, body = self._route()
        if status:  # 0: the client hung up, nothing to send
            self._send(status, headers, body)

    def _route(self) -> tuple[int, dict[str, str], bytes]:
        standin = self.server.standin
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = RecordedRequest(self.path, headers, raw, time.monotonic())
        standin.record(request)
        if self.path != PATH:
            return _error(404, "not_found", f"{self.path}: no such endpoint")
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key != standin.api_key:
            return _error(401, "unauthorized", "authorization: invalid or missing header value")
        try:
            _parse(headers.get("content-type", ""), raw, request)
        except BadRequest as exc:
            return _error(400, "bad_request", str(exc))
        return standin.answer(self)

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

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True


def _parse(content_type: str, raw: bytes, request: RecordedRequest) -> None:
    """Check the form the way the endpoint does and fill in the recorded fields."""
    if not content_type.startswith("multipart/form-data") or "boundary=" not in content_type:
        raise BadRequest("content-type: must be multipart/form-data with a boundary")
    message = BytesParser(policy=HTTP).parsebytes(b"content-type: " + content_type.encode() + b"\r\n\r\n" + raw)
    if not message.is_multipart() or message.defects:
        raise BadRequest(f"body: malformed multipart/form-data ({message.defects})")
    for part in message.iter_parts():
        _parse_part(part, request)
    if not request.image_content_type:
        raise BadRequest("image: is required")
    for name, low, high in (("foreground_ratio", 0.1, 1.0), ("vertex_count", -1, 20000)):
        if name in request.fields:
            value = _number(name, request.fields[name], float if name == "foreground_ratio" else int)
            if not low <= value <= high:
                raise BadRequest(f"{name}: must be between {low} and {high}")
    texture = request.fields.get("texture_resolution")
    if texture is not None and _number("texture_resolution", texture, int) not in (512, 1024, 2048):
        raise BadRequest("texture_resolution: must be one of 512, 1024, 2048")
    if request.fields.get("remesh", "none") not in ("none", "triangle", "quad"):
        raise BadRequest("remesh: must be one of none, triangle, quad")


def _parse_part(part: Message, request: RecordedRequest) -> None:
    if part.get_content_disposition() != "form-data":
        raise BadRequest("body: every part must be content-disposition form-data")
    name = part.get_param("name", header="content-disposition")
    if not isinstance(name, str) or name not in _FIELDS:
        raise BadRequest(f"{name}: unknown field")
    if name in request.fields or (name == "image" and request.image_content_type):
        raise BadRequest(f"{name}: given more than once")
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    if name != "image":
        if part.get_filename() is not None:
            raise BadRequest(f"{name}: must be a plain field, not a file")
        request.fields[name] = data.decode()
        return
    content_type = part.get_content_type()
    if part.get_filename() is None or content_type not in _IMAGE_TYPES:
        raise BadRequest(f"image: must be a file of type {', '.join(_IMAGE_TYPES)}, got {content_type}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            found = image.format
    except OSError as exc:
        raise BadRequest(f"image: cannot be decoded ({exc})") from None
    if found != _IMAGE_TYPES[content_type]:
        raise BadRequest(f"image: is {found}, not {content_type}")
    request.image, request.image_content_type, request.image_filename = data, content_type, part.get_filename() or ""


def _number(name: str, text: str, kind: type[float] | type[int]) -> float:
    try:
        return kind(text)
    except ValueError:
        raise BadRequest(f"{name}: must be a number") from None


def _error(status: int, name: str, *errors: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"id": uuid.uuid4().hex, "name": name, "errors": list(errors)}).encode()
    return status, {"content-type": "application/json"}, body

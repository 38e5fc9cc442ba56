"""The Stable Fast 3D mesh provider against a local stand-in speaking Stability's REST API."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from PIL import Image

from kiln_mesh.config import StableFast3DSettings
from kiln_mesh.providers.base import MeshInput, MeshOutput
from kiln_mesh.providers.stable_fast_3d import StableFast3DProvider, glb_counts
from kiln_runtime.errors import Cancelled, InvalidArgument, KilnError, Overloaded, ProviderFailed
from kiln_runtime.provider import ProgressUpdate, Reproducibility, RunContext, Stage
from kiln_runtime.vendor_errors import ContentBlockedInput, VendorAuth, VendorQuota, VendorUnavailable
from tests.standins.stable_fast_3d import StableFast3DStandIn, sphere_glb

KEY = "sk-standin-SECRET-0123456789"
INPUT_COLOR = (200, 100, 50, 255)
VENDOR_STAGES = [Stage.VENDOR_SUBMITTED, Stage.VENDOR_WAITING, Stage.VENDOR_RECEIVED]


@pytest.fixture
def sf3d() -> Iterator[StableFast3DStandIn]:
    with StableFast3DStandIn(api_key=KEY) as server:
        yield server


def make_provider(sf3d: StableFast3DStandIn, **settings: Any) -> StableFast3DProvider:
    provider = StableFast3DProvider(StableFast3DSettings(**{"api_key": KEY, "base_url": sf3d.base_url, **settings}))
    provider.load()
    return provider


def make_request(**fields: Any) -> MeshInput:
    defaults: dict[str, Any] = {
        "image": Image.new("RGBA", (64, 48), INPUT_COLOR),
        "remove_background": "AUTO",
        "foreground_ratio": 0.8500000238418579,  # 0.85 as it arrives from a proto float
        "mc_resolution": 256,
        "mc_threshold": 25.0,
    }
    return MeshInput(**{**defaults, **fields})


def run(provider: StableFast3DProvider, request: MeshInput | None = None) -> tuple[MeshOutput, list[Stage]]:
    updates: list[ProgressUpdate] = []
    output = provider.run(request or make_request(), RunContext("job-1", updates.append))
    return output, [update.stage for update in updates]


def run_failing(provider: StableFast3DProvider, error: type[KilnError], request: MeshInput | None = None) -> KilnError:
    with pytest.raises(error) as caught:
        run(provider, request)
    assert KEY not in str(caught.value) and KEY not in str(caught.value.metadata)
    return caught.value


def test_success_returns_the_vendor_glb_unchanged_with_its_counts(sf3d: StableFast3DStandIn) -> None:
    output, stages = run(make_provider(sf3d))

    assert output.encoded == sphere_glb()
    assert output.mesh is None and output.textured is None
    assert (output.vertex_count, output.face_count) == (2 + 16 * 7, 2 * 16 * 7)
    assert output.background_removed is False
    assert stages == VENDOR_STAGES


def test_request_is_multipart_with_the_png_and_the_key_only_in_its_header(sf3d: StableFast3DStandIn) -> None:
    run(make_provider(sf3d))

    [sent] = sf3d.requests
    assert sent.path == "/v2beta/3d/stable-fast-3d"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert KEY.encode() not in sent.raw_body
    assert sent.image_content_type == "image/png"
    with Image.open(io.BytesIO(sent.image)) as image:
        assert image.format == "PNG" and image.size == (64, 48) and image.mode == "RGBA"
        assert image.getpixel((0, 0)) == INPUT_COLOR
    # No bake requested: the vendor's default texture size applies.
    assert sent.fields == {"foreground_ratio": "0.85"}


def test_a_baked_texture_size_is_sent_and_an_unsupported_one_refused(sf3d: StableFast3DStandIn) -> None:
    run(make_provider(sf3d), make_request(bake_texture=True, texture_resolution=2048))
    assert sf3d.requests[0].fields["texture_resolution"] == "2048"

    error = run_failing(make_provider(sf3d), InvalidArgument, make_request(bake_texture=True, texture_resolution=4096))
    assert isinstance(error, InvalidArgument) and error.violations[0].field == "texture_resolution"
    assert len(sf3d.requests) == 1


def test_other_image_modes_are_sent_as_png(sf3d: StableFast3DStandIn) -> None:
    run(make_provider(sf3d), make_request(image=Image.new("CMYK", (32, 32), (0, 0, 0, 0))))
    with Image.open(io.BytesIO(sf3d.requests[0].image)) as image:
        assert image.format == "PNG" and image.mode == "RGB"


@pytest.mark.parametrize("output_format", ["OBJ", "STL", "PLY"])
def test_formats_other_than_glb_are_refused_before_any_http_call(sf3d: StableFast3DStandIn, output_format: str) -> None:
    updates: list[ProgressUpdate] = []
    with pytest.raises(InvalidArgument) as caught:
        make_provider(sf3d).run(make_request(output_format=output_format), RunContext("job-1", updates.append))

    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("output_format", "the stable_fast_3d provider returns GLB only")
    ]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sf3d.requests == [] and updates == []


def test_400_naming_a_field_is_invalid_argument_on_that_field(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario, sf3d.bad_field = "bad_request", "image"
    error = run_failing(make_provider(sf3d), InvalidArgument)

    assert isinstance(error, InvalidArgument) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    [violation] = error.violations
    assert violation.field == "image" and "rejected by Stable Fast 3D: is invalid" in violation.description


def test_400_naming_nothing_the_caller_sent_is_a_provider_failure(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario, sf3d.bad_field = "bad_request", "seed"
    error = run_failing(make_provider(sf3d), ProviderFailed)

    assert error.code == grpc.StatusCode.INTERNAL and "HTTP 400 bad_request" in error.message
    assert "seed: is invalid" in error.message
    assert error.metadata["vendor_reason"] == "bad_request" and error.metadata["vendor_error_id"]


def test_content_moderation_is_content_blocked_input(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario = "content_moderation"
    error = run_failing(make_provider(sf3d), ContentBlockedInput)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "CONTENT_BLOCKED_INPUT"
    assert error.metadata["vendor"] == "stability"
    assert error.metadata["vendor_reason"] == "content_moderation" and error.metadata["http_status"] == "403"
    assert "another image" in error.message


def test_wrong_key_is_vendor_auth(sf3d: StableFast3DStandIn) -> None:
    provider = StableFast3DProvider(StableFast3DSettings(api_key="not-the-key", base_url=sf3d.base_url))
    with pytest.raises(VendorAuth) as caught:
        run(provider)

    assert caught.value.code == grpc.StatusCode.INTERNAL and caught.value.reason == "VENDOR_AUTH"
    assert caught.value.metadata["vendor_reason"] == "unauthorized" and caught.value.metadata["http_status"] == "401"
    assert "not-the-key" not in str(caught.value)


def test_413_is_invalid_argument_on_the_image(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario = "too_large"
    error = run_failing(make_provider(sf3d), InvalidArgument)
    assert isinstance(error, InvalidArgument) and error.violations[0].field == "image"
    assert "too large" in error.violations[0].description


@pytest.mark.parametrize(("retry_after", "expected_s"), [("7", 7.0), (None, 60.0)])
def test_429_is_resource_exhausted_with_retry_info(
    sf3d: StableFast3DStandIn, retry_after: str | None, expected_s: float
) -> None:
    sf3d.scenario, sf3d.retry_after = "rate_limited", retry_after
    error = run_failing(make_provider(sf3d), VendorQuota)

    assert isinstance(error, Overloaded) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "VENDOR_QUOTA" and error.retry_after_s == pytest.approx(expected_s)
    assert error.metadata["vendor_reason"] == "rate_limit_exceeded" and error.metadata["http_status"] == "429"
    assert len(sf3d.requests) == 1  # not retried here: the client is told when to come back
    retry_info = error_details_pb2.RetryInfo()
    assert error.to_status("mesh.kiln.dev").details[1].Unpack(retry_info)
    assert retry_info.retry_delay.ToNanoseconds() == int(expected_s * 1e9)


def test_500_is_vendor_unavailable(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario = "internal"
    error = run_failing(make_provider(sf3d), VendorUnavailable)

    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "VENDOR_UNAVAILABLE"
    assert error.metadata["http_status"] == "500" and error.metadata["vendor_reason"] == "internal_error"


def test_unreachable_vendor_is_vendor_unavailable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = StableFast3DProvider(StableFast3DSettings(api_key=KEY, base_url=f"http://127.0.0.1:{port}"))
    error = run_failing(provider, VendorUnavailable)
    assert error.metadata["vendor_reason"] == "ConnectError"


def test_an_answer_that_is_not_a_glb_is_a_provider_failure(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario = "not_glb"
    error = run_failing(make_provider(sf3d), ProviderFailed)
    assert "not a GLB" in error.message and error.metadata["vendor_reason"] == "NOT_GLB"


def test_timeout_is_vendor_unavailable_mentioning_it(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario, sf3d.slow_s = "slow", 10.0
    started = time.monotonic()
    error = run_failing(make_provider(sf3d, timeout_s=0.3), VendorUnavailable)

    assert time.monotonic() - started < 1.5
    assert "0.3 s" in error.message and "timeout" in error.message
    assert error.metadata["vendor_reason"] == "TIMEOUT"
    assert sf3d.disconnected.wait(2.0)


def test_cancel_aborts_the_http_call(sf3d: StableFast3DStandIn) -> None:
    sf3d.scenario, sf3d.slow_s = "slow", 10.0
    updates: list[ProgressUpdate] = []
    ctx = RunContext("job-1", updates.append)
    cancelled_at: list[float] = []

    def cancel() -> None:
        cancelled_at.append(time.monotonic())
        ctx.cancel()

    timer = threading.Timer(0.3, cancel)
    timer.start()
    try:
        with pytest.raises(Cancelled):
            make_provider(sf3d).run(make_request(), ctx)
        latency = time.monotonic() - cancelled_at[0]
    finally:
        timer.cancel()
        timer.join()

    assert latency < 0.5
    assert [update.stage for update in updates] == [Stage.VENDOR_SUBMITTED, Stage.VENDOR_WAITING]
    assert sf3d.disconnected.wait(2.0), "the stand-in never saw the connection close"


@pytest.mark.parametrize("scenario", ["success", "bad_request", "content_moderation", "rate_limited", "internal"])
def test_the_key_never_reaches_the_log(
    sf3d: StableFast3DStandIn, caplog: pytest.LogCaptureFixture, scenario: str
) -> None:
    sf3d.scenario = scenario
    caplog.set_level(logging.DEBUG)
    with contextlib.suppress(KilnError):
        run(make_provider(sf3d))
    with pytest.raises(VendorAuth):  # a rejected key is the likeliest moment to log one
        run(StableFast3DProvider(StableFast3DSettings(api_key=KEY + "x", base_url=sf3d.base_url)))

    assert any(record.name.startswith("httpcore") for record in caplog.records)  # DEBUG really was captured
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in repr(record.args)
    assert base64.b64encode(KEY.encode()).decode() not in caplog.text


def test_describe_reports_a_vendor_model() -> None:
    description = StableFast3DProvider(StableFast3DSettings(api_key=KEY)).describe()

    assert description.kind == "stable_fast_3d" and description.model_id == "stable-fast-3d"
    assert description.device == "vendor" and description.dtype == ""
    assert description.reproducibility == Reproducibility.NONE
    assert KEY not in repr(description)


def test_load_without_key_names_the_setting() -> None:
    with pytest.raises(ValueError, match="KILN_MESH__STABLE_FAST_3D__API_KEY"):
        StableFast3DProvider(StableFast3DSettings()).load()


def _glb(document: dict[str, Any]) -> bytes:
    chunk = json.dumps(document).encode()
    chunk += b" " * (-len(chunk) % 4)
    return b"glTF" + struct.pack("<II", 2, 20 + len(chunk)) + struct.pack("<II", len(chunk), 0x4E4F534A) + chunk


def test_glb_counts_sum_primitives_and_follow_the_draw_mode() -> None:
    accessors = [{"count": 10}, {"count": 30}, {"count": 8}, {"count": 6}]
    meshes = [
        {"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]},  # 10 triangles
        {"primitives": [{"attributes": {"POSITION": 2}, "indices": 3, "mode": 5}]},  # a strip of 6: 4
        {"primitives": [{"attributes": {"POSITION": 3}}]},  # unindexed triangles: 2
        {"primitives": [{"attributes": {"POSITION": 2}, "mode": 1}]},  # lines: none
    ]
    assert glb_counts(_glb({"accessors": accessors, "meshes": meshes})) == (10 + 8 + 6 + 8, 10 + 4 + 2)
    assert glb_counts(_glb({"asset": {"version": "2.0"}})) == (0, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"glTF" + struct.pack("<II", 1, 20) + struct.pack("<II", 0, 0x4E4F534A),  # glTF 1
        _glb({"meshes": [{"primitives": [{"attributes": {"POSITION": 3}}]}]}),  # no such accessor
        _glb({"meshes": [{"primitives": [{}]}]}),
    ],
)
def test_glb_counts_refuse_malformed_files(data: bytes) -> None:
    with pytest.raises(ProviderFailed, match="GLB"):
        glb_counts(data)


def test_jobs_share_one_connection_until_close_and_run_again_after_it(sf3d: StableFast3DStandIn) -> None:
    provider = make_provider(sf3d)
    try:
        run(provider)
        run(provider)
        assert (len(sf3d.requests), sf3d.connections) == (2, 1), "the second job reused the first's connection"
        provider.close()  # what an idle unload does; the model manager may load the same object again
        output, _ = run(provider)
        assert output.encoded == sphere_glb()
        assert (len(sf3d.requests), sf3d.connections) == (3, 2)
    finally:
        provider.close()

"""A 100 MB artifact out through Envoy with bounded memory, `Range`, and the client's streaming download.

The model server runs as its own process (`python -m kiln_img2img`, fake provider), so its peak
resident memory (VmHWM) is its own; Envoy's is read the same way. The artifact is written into
the server's storage folder by a `LocalArtifactStore` here, as a finished job would leave it.
The downloads pause after their first megabytes: a server that ignored flow control would read
the rest of the file into grpc's send buffer meanwhile, and its peak memory would show it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gateway.kiln_gateway import Envoy
from kiln.artifacts.v1 import artifact_service_pb2 as artifacts
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln_runtime.artifact_servicer import DOWNLOAD_CHUNK_BYTES
from kiln_runtime.storage import LocalArtifactStore, StoredArtifact, new_job_id
from tests.gateway.conftest import envoy_for

MiB = 1 << 20
BIG_BYTES = 100 * 1000 * 1000  # "100 MB"
#: Allowed growth of a process's peak memory while it relays the big artifact: well under the
#: artifact's size, room for a few pieces in each buffer on the way (grpc, HTTP/2 windows,
#: Envoy's per-stream buffers), allocator slack and a busy machine.
SERVER_GROWTH_LIMIT = 16 * MiB
#: Without the gateway's upstream HTTP/2 windows (render.UPSTREAM_STREAM_WINDOW_BYTES) Envoy's
#: peak grew by ~28 MiB here during the pause: the server filled Envoy's 256 MiB default window.
ENVOY_GROWTH_LIMIT = 12 * MiB
#: The client's limit, four 4 MiB messages (the client's receive cap): grpc's receive window, which
#: its bandwidth probe widens on loopback, and a few pieces, whatever the artifact's size (measured:
#: +2-5 MiB for 20 MB and for 100 MB on a quiet machine, up to +8.3 MiB with both cores busy).
CLIENT_GROWTH_LIMIT = 16 * MiB
PAUSE_AFTER_BYTES = 8 * MiB
PAUSE_S = 2.0


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    store: LocalArtifactStore


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc (Linux)")
    root = tmp_path_factory.mktemp("large")
    outputs = root / "outputs"
    env = {
        **os.environ,
        "KILN_STORAGE__DATA_DIR": str(root),
        "KILN_STORAGE__OUTPUT_DIR": str(outputs),
        "KILN_IMG2IMG__PROVIDER": "fake",
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_PORT": "0",
        "KILN_TELEMETRY__LOG_FORMAT": "json",
    }
    # The log goes to a file: a pipe nobody drains could fill and block the server.
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kiln_img2img"], env=env, cwd=root, stderr=log, stdout=subprocess.DEVNULL
        )
    port = 0
    deadline = time.monotonic() + 60
    while not port and time.monotonic() < deadline and process.poll() is None:
        for line in log_path.read_text().split("\n")[:-1]:  # whole lines only
            message = json.loads(line).get("message", "")
            if "serving on" in message:
                port = int(message.split(":")[1].split()[0])
        time.sleep(0.05)
    if not port:
        process.kill()
        process.wait()
        raise AssertionError(f"the server did not listen:\n{log_path.read_text()[-4000:]}")
    try:
        yield ServerProcess(process, port, LocalArtifactStore(outputs))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def envoy(server: ServerProcess) -> Iterator[Envoy]:
    with envoy_for([server.port], [server.port]) as running:
        yield running


@pytest.fixture(scope="module")
def big(server: ServerProcess) -> StoredArtifact:
    # Random bytes, so no layer on the way can shrink them; written once for the module.
    return server.store.put(new_job_id(), "big.glb", os.urandom(BIG_BYTES), media_type="model/gltf-binary")


@pytest.fixture(scope="module")
def small(server: ServerProcess) -> tuple[StoredArtifact, bytes]:
    data = os.urandom(3 * DOWNLOAD_CHUNK_BYTES + 123)
    return server.store.put(new_job_id(), "small.ply", data, media_type="application/octet-stream"), data


def url(envoy: Envoy, artifact: StoredArtifact) -> str:
    return f"http://127.0.0.1:{envoy.port}/v1/artifacts/{artifact.id}"


def get(envoy: Envoy, artifact: StoredArtifact, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url(envoy, artifact), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def warm_up(envoy: Envoy, small: tuple[StoredArtifact, bytes]) -> None:
    """One small download first, so thread pools and connections exist before peaks are read."""
    status, _, body = get(envoy, small[0])
    assert status == 200 and body == small[1]


def test_100_mb_through_the_gateway_with_bounded_memory(
    server: ServerProcess, envoy: Envoy, big: StoredArtifact, small: tuple[StoredArtifact, bytes]
) -> None:
    warm_up(envoy, small)
    assert envoy.process is not None
    server_before, envoy_before = peak_rss(server.process.pid), peak_rss(envoy.process.pid)
    digest = hashlib.sha256()
    received = 0
    paused = False
    with urllib.request.urlopen(url(envoy, big), timeout=120) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        while piece := response.read(1 * MiB):
            digest.update(piece)
            received += len(piece)
            if received >= PAUSE_AFTER_BYTES and not paused:
                paused = True
                time.sleep(PAUSE_S)  # a slow reader: the server must wait, not buffer
    server_growth = peak_rss(server.process.pid) - server_before
    envoy_growth = peak_rss(envoy.process.pid) - envoy_before
    print(f"\n100 MB via Envoy: peak RSS server +{server_growth / MiB:.1f} MiB, Envoy +{envoy_growth / MiB:.1f} MiB")
    assert response.status == 200
    assert headers["content-length"] == str(BIG_BYTES)
    assert headers["content-type"] == "model/gltf-binary"
    assert headers["accept-ranges"] == "bytes"
    assert "transfer-encoding" not in headers and not any(key.startswith("x-kiln-") for key in headers)
    assert received == BIG_BYTES and digest.hexdigest() == big.sha256
    assert server_growth < SERVER_GROWTH_LIMIT
    assert envoy_growth < ENVOY_GROWTH_LIMIT


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [("bytes=100-199", 100, 200), ("bytes=-10", None, None), ("bytes=262144-", 262144, None)],
)
def test_range_gives_206_with_content_range(
    envoy: Envoy, small: tuple[StoredArtifact, bytes], header: str, start: int | None, stop: int | None
) -> None:
    artifact, data = small
    expected = data[-10:] if start is None else data[start:stop]
    first = len(data) - len(expected) if start is None else start
    status, headers, body = get(envoy, artifact, Range=header)
    assert status == 206
    assert body == expected
    assert headers["content-length"] == str(len(expected))
    assert headers["content-range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"


def test_unusable_range_is_ignored_and_past_the_end_is_refused(
    envoy: Envoy, small: tuple[StoredArtifact, bytes]
) -> None:
    artifact, data = small
    status, headers, body = get(envoy, artifact, Range="bytes=0-1,5-9")  # several ranges: whole body
    assert (status, body, headers.get("content-range")) == (200, data, None)
    status, headers, body = get(envoy, artifact, Range=f"bytes={len(data)}-")
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(data)}"
    assert "past the end" in json.loads(body)["message"]


def test_curl_resumes_a_download(envoy: Envoy, small: tuple[StoredArtifact, bytes], tmp_path: Path) -> None:
    artifact, data = small
    destination = tmp_path / "small.ply"
    destination.write_bytes(data[:1000])  # an interrupted download
    command = ["curl", "-sS", "--max-time", "60", "-C", "-", "-o", str(destination), url(envoy, artifact)]
    resumed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert destination.read_bytes() == data
    # Resuming a complete file: 416, which curl takes as "already complete", appending nothing.
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert destination.read_bytes() == data


def test_grpc_download_through_the_gateway_in_pieces_with_offset(
    envoy: Envoy, small: tuple[StoredArtifact, bytes], big: StoredArtifact
) -> None:
    artifact, data = small
    with grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        stub = artifacts_grpc.ArtifactProviderStub(channel)
        call = stub.DownloadArtifact(artifacts.DownloadArtifactRequest(artifact_id=artifact.id), timeout=30)
        pieces = list(call)
        metadata = dict(call.initial_metadata())
        resumed = stub.DownloadArtifact(
            artifacts.DownloadArtifactRequest(artifact_id=artifact.id, offset=1000, length=50), timeout=30
        )
        tail = b"".join(body.data for body in resumed)
        with pytest.raises(grpc.RpcError) as too_big:
            stub.GetArtifact(artifacts.GetArtifactRequest(artifact_id=big.id), timeout=30)
    assert b"".join(body.data for body in pieces) == data
    assert pieces[0].content_type == artifact.media_type
    assert max(len(body.data) for body in pieces) == DOWNLOAD_CHUNK_BYTES
    assert metadata["x-kiln-content-length"] == str(len(data))  # gRPC answers keep the raw metadata
    assert tail == data[1000:1050]
    # GetArtifact still answers one message, and says where to go when it cannot.
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "DownloadArtifact" in (too_big.value.details() or "")


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from kiln.common.v1 import artifact_pb2
    from kiln_client import Img2ImgClient

    target, warm_up, artifact_id, sha256, size, destination = sys.argv[1:]
    artifact = artifact_pb2.Artifact(id=artifact_id, sha256=sha256, size_bytes=int(size))
    small = artifact_pb2.Artifact(**json.loads(warm_up))

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    with Img2ImgClient(target, timeout=120) as client:
        # One small download first: the channel, its threads and the code paths exist before the baseline.
        client.download(small, destination)
        before = peak()
        client.download(artifact, destination)
        after = peak()
    print(json.dumps({"before": before, "after": after}))
    """
)


def test_client_download_streams_to_disk(
    envoy: Envoy, big: StoredArtifact, small: tuple[StoredArtifact, bytes], tmp_path: Path
) -> None:
    destination = tmp_path / "big.glb"
    warm_up = {"id": small[0].id, "sha256": small[0].sha256, "size_bytes": small[0].size_bytes}
    # Through the gateway (DownloadArtifact over gRPC via Envoy), as a caller outside the cluster would.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT_SCRIPT,
            f"127.0.0.1:{envoy.port}",
            json.dumps(warm_up),
            big.id,
            big.sha256,
            str(big.size_bytes),
            str(destination),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout)
    growth = peaks["after"] - peaks["before"]
    print(f"\nclient download of 100 MB: peak RSS {peaks['before'] / MiB:.1f} -> {peaks['after'] / MiB:.1f} MiB")
    assert destination.stat().st_size == BIG_BYTES
    assert hashlib.sha256(destination.read_bytes()).hexdigest() == big.sha256
    assert list(tmp_path.glob(".*.part")) == []
    assert growth < CLIENT_GROWTH_LIMIT

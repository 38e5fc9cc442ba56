"""`ArtifactProvider.DownloadArtifact` on a real server: pieces, ranges, errors, and `parse_range`."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from kiln.artifacts.v1 import artifact_service_pb2 as artifacts
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln_runtime.artifact_servicer import DOWNLOAD_CHUNK_BYTES, RangeNotSatisfiable, parse_range
from kiln_runtime.storage import new_job_id
from tests.servers import StartServer

SIZE = 2 * DOWNLOAD_CHUNK_BYTES + 17


@pytest.mark.parametrize(
    ("header", "span"),
    [
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=-10", (990, 1000)),
        ("bytes=-5000", (0, 1000)),  # a suffix longer than the file is the whole file
        ("bytes=900-5000", (900, 1000)),  # the last byte position is clamped
        ("bytes = 5-6", (5, 7)),
        ("bytes=0-1,5-9", None),  # several ranges: ignored, the whole body is sent
        ("bytes=9-5", None),  # last < first: invalid, ignored
        ("items=0-5", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header: str, span: tuple[int, int] | None) -> None:
    assert parse_range(header, 1000) == span


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range_names_the_size(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as raised:
        parse_range(header, 1000)
    assert raised.value.trailers() == (("x-kiln-content-range", "bytes */1000"),)


async def test_download_streams_pieces_with_length_metadata(start_server: StartServer) -> None:
    server, channel = await start_server("img2img")
    data = os.urandom(SIZE)
    stored = server.runtime.store.put(new_job_id(), "mesh.glb", data, media_type="model/gltf-binary")
    stub = artifacts_grpc.ArtifactProviderStub(channel)
    call = stub.DownloadArtifact(artifacts.DownloadArtifactRequest(artifact_id=stored.id))
    pieces = [body async for body in call]
    metadata = dict(await call.initial_metadata())
    assert b"".join(body.data for body in pieces) == data
    assert [len(body.data) for body in pieces] == [DOWNLOAD_CHUNK_BYTES, DOWNLOAD_CHUNK_BYTES, 17]
    assert [body.content_type for body in pieces] == ["model/gltf-binary", "", ""]
    assert metadata["x-kiln-content-length"] == str(SIZE)
    assert "x-kiln-content-range" not in metadata

    part = stub.DownloadArtifact(artifacts.DownloadArtifactRequest(artifact_id=stored.id, offset=SIZE - 20, length=5))
    assert b"".join([body.data async for body in part]) == data[SIZE - 20 : SIZE - 15]
    part_metadata = dict(await part.initial_metadata())
    assert part_metadata["x-kiln-content-range"] == f"bytes {SIZE - 20}-{SIZE - 16}/{SIZE}"


async def test_empty_artifact_is_one_empty_message(start_server: StartServer) -> None:
    server, channel = await start_server("img2img")
    stored = server.runtime.store.put(new_job_id(), "empty.obj", b"", media_type="model/obj")
    call = artifacts_grpc.ArtifactProviderStub(channel).DownloadArtifact(
        artifacts.DownloadArtifactRequest(artifact_id=stored.id)
    )
    pieces = [body async for body in call]
    assert [(body.content_type, body.data) for body in pieces] == [("model/obj", b"")]


@pytest.mark.parametrize(
    ("artifact_id", "fields", "code", "needle"),
    [
        ("01M8BRC3EP29HK3C17SXJ4WSHZ/none.glb", {}, grpc.StatusCode.NOT_FOUND, "no artifact"),
        ("../etc/passwd", {}, grpc.StatusCode.INVALID_ARGUMENT, "expected <job id>/<file name>"),
        (None, {"offset": -1}, grpc.StatusCode.INVALID_ARGUMENT, "offset"),
        (None, {"offset": SIZE}, grpc.StatusCode.OUT_OF_RANGE, "past the end"),
    ],
)
async def test_download_errors(
    start_server: StartServer,
    artifact_id: str | None,
    fields: dict[str, int],
    code: grpc.StatusCode,
    needle: str,
) -> None:
    server, channel = await start_server("img2img")
    if artifact_id is None:
        artifact_id = server.runtime.store.put(new_job_id(), "a.bin", os.urandom(SIZE), media_type="x/y").id
    call = artifacts_grpc.ArtifactProviderStub(channel).DownloadArtifact(
        artifacts.DownloadArtifactRequest(artifact_id=artifact_id, **fields)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == code
    assert needle in (raised.value.details() or "")
    # A failed download leaves the server serving: the same call for a stored artifact works.
    ok = server.runtime.store.put(new_job_id(), "b.bin", b"abc", media_type="x/y")
    stub = artifacts_grpc.ArtifactProviderStub(channel)
    bodies = [body async for body in stub.DownloadArtifact(artifacts.DownloadArtifactRequest(artifact_id=ok.id))]
    assert b"".join(body.data for body in bodies) == b"abc"


async def test_cancelled_download_closes_its_file(start_server: StartServer) -> None:
    server, channel = await start_server("img2img")
    stored = server.runtime.store.put(new_job_id(), "big.bin", os.urandom(16 * DOWNLOAD_CHUNK_BYTES), media_type="x/y")
    call = artifacts_grpc.ArtifactProviderStub(channel).DownloadArtifact(
        artifacts.DownloadArtifactRequest(artifact_id=stored.id)
    )
    await call.read()
    call.cancel()
    # The server side ends too: its open files are closed (checked through /proc where it exists).
    data_file = server.runtime.store.root / stored.id
    for _ in range(100):
        if not _is_open(data_file):
            break
        await asyncio.sleep(0.05)
    assert not _is_open(data_file)


def _is_open(path: os.PathLike[str]) -> bool:
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("open files are listed from /proc (Linux)")
    target = os.path.realpath(path)
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, name)) == target:
                return True
        except OSError:
            continue
    return False

"""`S3ArtifactStore` against a real SeaweedFS: the local backend's guarantees, on a bucket."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kiln_runtime.storage import ArtifactNotFound, ArtifactStore, InvalidArtifactId, new_job_id
from kiln_runtime.storage.s3 import S3ArtifactStore, StorageUnavailable
from tests.s3.conftest import BUCKET, MakeStore, keys, uploads
from tests.s3.seaweed import SeaweedFS, free_port

MiB = 1 << 20


def test_put_get_read_and_list(make_store: MakeStore) -> None:
    store = make_store()
    assert isinstance(store, ArtifactStore)
    job_id = new_job_id()
    data = os.urandom(100_000)
    stored = store.put(job_id, "image.png", data, media_type="image/png", metadata={"seed": "7"})
    assert stored.id == f"{job_id}/image.png"
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size_bytes == len(data)

    got = store.get(stored.id)
    assert (got.media_type, got.size_bytes, got.sha256, got.metadata) == (
        "image/png",
        len(data),
        stored.sha256,
        {"seed": "7"},
    )
    assert store.read(stored.id) == data
    # Data first, then its commit marker: exactly two objects, under the configured prefix.
    assert keys(store) == [f"{job_id}/image.png", f"{job_id}/image.png.meta.json"]
    # The data object carries the media type, so a presigned download has the right content type.
    head = store.client.head_object(Bucket=BUCKET, Key=f"{store.prefix}{job_id}/image.png")
    assert head["ContentType"] == "image/png"


def test_chunks_are_ranged_reads(make_store: MakeStore) -> None:
    store = make_store()
    data = os.urandom(3 * MiB + 123)
    artifact_id = store.put(new_job_id(), "mesh.glb", data, media_type="model/gltf-binary").id
    pieces = list(store.chunks(artifact_id, chunk_bytes=64 * 1024))
    assert b"".join(pieces) == data
    assert max(len(p) for p in pieces) <= 64 * 1024
    assert b"".join(store.chunks(artifact_id, chunk_bytes=1000, start=5, stop=70_005)) == data[5:70_005]
    assert b"".join(store.chunks(artifact_id, chunk_bytes=1000, start=len(data) - 10)) == data[-10:]
    assert b"".join(store.chunks(artifact_id, chunk_bytes=1000, start=len(data), stop=len(data) + 50)) == b""
    with pytest.raises(ArtifactNotFound):
        next(store.chunks(f"{new_job_id()}/mesh.glb", chunk_bytes=1000))
    with pytest.raises(ValueError, match="bad range"):
        next(store.chunks(artifact_id, chunk_bytes=1000, start=10, stop=5))


def test_a_big_artifact_goes_up_in_parts(make_store: MakeStore) -> None:
    store = make_store(multipart_threshold_bytes=5 * MiB, part_bytes=5 * MiB)
    data = os.urandom(12 * MiB + 7)
    stored = store.put(new_job_id(), "mesh.glb", data, media_type="model/gltf-binary")
    head = store.client.head_object(Bucket=BUCKET, Key=f"{store.prefix}{stored.id}")
    # A multipart object's ETag is "<md5 of the parts' md5s>-<part count>".
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)
    assert hashlib.sha256(store.read(stored.id)).hexdigest() == stored.sha256
    assert uploads(store) == []


def test_ids_are_validated(make_store: MakeStore) -> None:
    store = make_store()
    for bad in ("../x/y.png", "nojob/y.png", f"{new_job_id()}/..", f"{new_job_id()}/a/b", f"{new_job_id()}/"):
        with pytest.raises(InvalidArtifactId):
            store.get(bad)
    with pytest.raises(InvalidArtifactId):
        store.put(new_job_id(), "x.png.meta.json", b"x", media_type="application/json")
    with pytest.raises(InvalidArtifactId):
        store.put("../../etc", "x.png", b"x", media_type="image/png")
    assert keys(store) == []


def test_data_without_its_commit_marker_is_absent_and_cleaned_up(make_store: MakeStore) -> None:
    store = make_store()
    job_id = new_job_id()
    # What a put that died between its two writes leaves behind.
    store.client.put_object(Bucket=BUCKET, Key=f"{store.prefix}{job_id}/half.png", Body=b"partial")
    with pytest.raises(ArtifactNotFound):
        store.get(f"{job_id}/half.png")
    with pytest.raises(ArtifactNotFound):
        store.read(f"{job_id}/half.png")
    time.sleep(3)
    kept = store.put(job_id, "whole.png", b"complete", media_type="image/png")
    # The job is recent (its newest object), so it stays; the leftover, older than the retention,
    # goes. S3 timestamps are whole seconds: the retention leaves a second of slack either side.
    assert store.cleanup(1.5, now=time.time()) == 0
    assert keys(store) == [f"{job_id}/whole.png", f"{job_id}/whole.png.meta.json"]
    assert store.read(kept.id) == b"complete"


def test_cleanup_by_age_and_delete_job(make_store: MakeStore) -> None:
    store = make_store()
    old_job, new_job = new_job_id(), new_job_id()
    store.put(old_job, "a.png", b"a", media_type="image/png")
    store.put(old_job, "b.png", b"b", media_type="image/png")
    time.sleep(3)
    store.put(new_job, "c.png", b"c", media_type="image/png")
    # S3 timestamps are whole seconds, so the retention leaves a second of slack either side.
    assert store.cleanup(1.5, now=time.time()) == 1
    assert keys(store) == [f"{new_job}/c.png", f"{new_job}/c.png.meta.json"]
    store.delete_job(new_job)
    store.delete_job(new_job)  # deleting nothing is not an error
    assert keys(store) == []
    with pytest.raises(ArtifactNotFound):
        store.read(f"{new_job}/c.png")


def test_presigned_uri_downloads_with_curl_and_expires(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(presign_expiry_s=2)
    data = os.urandom(200_000)
    stored = store.put(new_job_id(), "image.webp", data, media_type="image/webp")
    assert stored.uri.startswith(store.endpoint_url) and "X-Amz-Signature=" in stored.uri
    out = tmp_path / "image.webp"
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-D", "-", "-o", str(out), stored.uri], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data
    assert "content-type: image/webp" in result.stdout.lower()
    # The URL is the credential: once it expires the store refuses it.
    time.sleep(3)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stored.uri, timeout=10)
    assert refused.value.code == 403
    refused.value.close()
    # get() signs a fresh one.
    with urllib.request.urlopen(store.get(stored.id).uri, timeout=10) as response:
        assert response.read() == data


def test_public_endpoint_and_base_url_shape_the_uri(make_store: MakeStore, seaweed: SeaweedFS) -> None:
    public = make_store(public_endpoint_url=f"http://localhost:{seaweed.ports['s3.port']}")
    stored = public.put(new_job_id(), "x.png", b"x", media_type="image/png")
    assert stored.uri.startswith(f"http://localhost:{seaweed.ports['s3.port']}/{BUCKET}/")
    with urllib.request.urlopen(stored.uri, timeout=10) as response:  # signed for the host it names
        assert response.read() == b"x"
    cdn = make_store(public_base_url="https://cdn.example/kiln/")
    assert cdn.uri_for(stored.id) == f"https://cdn.example/kiln/{stored.id}"


_INTERRUPTED_PUT = textwrap.dedent(
    """
    import os, sys
    from kiln_runtime.storage.s3 import S3ArtifactStore
    store = S3ArtifactStore(bucket=sys.argv[1], prefix=sys.argv[2], endpoint_url=sys.argv[3],
                            multipart_threshold_bytes=5 << 20, part_bytes=5 << 20)
    store.put(sys.argv[4], "mesh.glb", os.urandom(400 << 20), media_type="model/gltf-binary")
    print("finished")
    """
)


def test_an_interrupted_multipart_upload_leaves_nothing_visible(make_store: MakeStore, aws_env: dict[str, str]) -> None:
    store = make_store()
    job_id = new_job_id()
    process = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_PUT, BUCKET, store.prefix, store.endpoint_url, job_id],
        env={**os.environ, **aws_env},
        stdout=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        # Kill the writer once the upload has parts in the store: a crash in the middle of it.
        while True:
            assert process.poll() is None, "the upload ended before it could be interrupted"
            started = store.client.list_multipart_uploads(Bucket=BUCKET, Prefix=store.prefix).get("Uploads", [])
            if started:
                upload = started[0]
                parts = store.client.list_parts(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
                if parts.get("Parts"):
                    break
            assert time.monotonic() < deadline, "no multipart upload appeared"
            time.sleep(0.02)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.stdout is not None and process.stdout.read() == b""  # it never finished
    process.stdout.close()
    assert uploads(store) == [f"{store.prefix}{job_id}/mesh.glb"]
    # Nothing listed, nothing readable: the parts are invisible until completed.
    assert keys(store) == []
    with pytest.raises(ArtifactNotFound):
        store.get(f"{job_id}/mesh.glb")
    # A sweep (here: everything counts as stale) aborts the dead upload, freeing its parts.
    store.cleanup(0, now=time.time() + 60)
    assert uploads(store) == []


def test_readiness_check_names_the_problem(
    make_store: MakeStore, seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_store().check()  # reachable, credentials accepted, bucket exists
    with pytest.raises(StorageUnavailable, match="no such bucket"):
        make_store(bucket="no-such-bucket").check()
    with pytest.raises(StorageUnavailable, match=r"cannot reach .*KILN_STORAGE__S3__ENDPOINT_URL"):
        make_store(endpoint_url=f"http://127.0.0.1:{free_port()}").check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageUnavailable, match="credentials were refused") as refused:
        make_store().check()
    assert "not-the-secret" not in str(refused.value)
    # Refused for writes too, with the operation named.
    with pytest.raises(StorageUnavailable, match="upload"):
        make_store().put(new_job_id(), "x.png", b"x", media_type="image/png")


def test_an_open_bucket_takes_any_key(tmp_path: Path, aws_env: dict[str, str]) -> None:
    from tests.s3.seaweed import start_seaweedfs

    weed = start_seaweedfs(tmp_path / "open", bucket="open")
    try:
        store = S3ArtifactStore(bucket="open", endpoint_url=weed.endpoint)
        store.check()
        stored = store.put(new_job_id(), "x.png", b"anonymous", media_type="image/png")
        assert store.read(stored.id) == b"anonymous"
    finally:
        weed.stop()
    assert not (tmp_path / "open").exists()


def test_lifecycle_rule_is_accepted(make_store: MakeStore) -> None:
    store = make_store()
    store.apply_lifecycle(retention_hours=30)
    rules = store.client.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert rules[0]["Expiration"] == {"Days": 2}
    assert rules[0]["Filter"] == {"Prefix": store.prefix}
    assert rules[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_settings_choose_the_backend() -> None:
    from kiln_runtime.settings import StorageSettings
    from kiln_runtime.storage import LocalArtifactStore, open_store

    assert isinstance(open_store(StorageSettings()), LocalArtifactStore)  # make up's default
    with pytest.raises(ValueError, match="KILN_STORAGE__S3__BUCKET"):
        StorageSettings(backend="s3")
    store = open_store(StorageSettings(backend="s3", s3={"bucket": "b", "endpoint_url": "http://127.0.0.1:1"}))
    assert isinstance(store, S3ArtifactStore) and store.prefix == "kiln/"
    store.close()


def test_job_ids_lists_each_job_folder_once(make_store: MakeStore) -> None:
    store = make_store()
    first, second = new_job_id(), new_job_id()
    store.put(first, "a.bin", b"1", media_type="x/y")
    store.put(first, "b.bin", b"2", media_type="x/y")
    store.put(second, "job.json", b"{}", media_type="application/json")
    assert sorted(store.job_ids()) == sorted([first, second])
    store.delete_job(first)
    assert store.job_ids() == [second]

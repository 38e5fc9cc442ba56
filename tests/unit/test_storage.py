from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kiln_runtime.signing import UrlSigner
from kiln_runtime.storage import (
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactId,
    LocalArtifactStore,
    StoredArtifact,
    new_job_id,
    validate_artifact_id,
    validate_job_id,
)

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
JOB = "01HZX3K5Q8R9T2V4W6Y7Z0ABCD"  # a fixed, well-formed job id
OTHER_JOB = "01HZX3K5Q8R9T2V4W6Y7Z0ABCE"

BAD_JOB_IDS = [
    "",
    "../x",
    "/etc/passwd",
    JOB.lower(),
    JOB[:-1],
    JOB + "0",
    JOB[:-1] + "I",  # I, L, O, U are not Crockford digits
    JOB[:-1] + "U",
    JOB + "\n",
    "..",
    ".",
]
BAD_NAMES = [
    "",
    "..",
    "../x",
    "/etc/passwd",
    ".hidden",
    "a/b",
    "a\\b",
    "%2e%2e",
    "%2e%2e%2fx",
    "x\x00",
    "x\n",
    "a..b",
    "-x",
    "a" * 129,
    "x y",
]
BAD_ARTIFACT_IDS = [
    "",
    "../x",
    "/etc/passwd",
    JOB,
    JOB + "/",
    "A" * 26 + "/../../x",
    f"{JOB}/..",
    f"{JOB}/.hidden",
    f"{JOB}/a/b",
    f"{JOB}/a\\b",
    f"{JOB}/%2e%2e",
    f"{JOB}/x\x00",
    f"{JOB}//x",
    f"/{JOB}/x",
    f"{JOB.lower()}/x",
    f"../{JOB}/x",
    f"{JOB}\\x",
]
RESERVED_NAMES = ["x.meta.json", "x.tmp", "x.png.meta.json"]


def decode_ms(job_id: str) -> int:
    value = 0
    for ch in job_id[:10]:
        value = value * 32 + CROCKFORD.index(ch)
    return value


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "out", local_path_uris=True)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# ---- ids ---------------------------------------------------------------------------------


def test_new_job_ids_are_unique_valid_and_carry_the_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_job_id() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    for job_id in ids:
        assert len(job_id) == 26
        assert validate_job_id(job_id) == job_id
        assert before <= decode_ms(job_id) <= after


def test_new_job_ids_sort_by_creation_time() -> None:
    earlier = [new_job_id() for _ in range(50)]
    time.sleep(0.002)
    later = [new_job_id() for _ in range(50)]
    assert max(earlier) < min(later)


def test_validate_accepts_good_ids() -> None:
    job_id = new_job_id()
    assert validate_job_id(JOB) == JOB
    assert validate_artifact_id(f"{job_id}/image.png") == (job_id, "image.png")
    assert validate_artifact_id(f"{JOB}/mesh_v2-final.glb") == (JOB, "mesh_v2-final.glb")
    assert validate_artifact_id(f"{JOB}/{'a' * 128}") == (JOB, "a" * 128)


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_validate_job_id_rejects(job_id: str) -> None:
    with pytest.raises(InvalidArtifactId):
        validate_job_id(job_id)


@pytest.mark.parametrize("artifact_id", BAD_ARTIFACT_IDS + [f"{JOB}/{name}" for name in BAD_NAMES])
def test_validate_artifact_id_rejects(artifact_id: str) -> None:
    with pytest.raises(InvalidArtifactId):
        validate_artifact_id(artifact_id)


def test_invalid_artifact_id_is_a_value_error_and_not_found_a_lookup_error() -> None:
    assert issubclass(InvalidArtifactId, ValueError)
    assert issubclass(ArtifactNotFound, LookupError)


@pytest.mark.parametrize("artifact_id", [*BAD_ARTIFACT_IDS, *(f"{JOB}/{n}" for n in RESERVED_NAMES)])
@pytest.mark.parametrize("method", ["get", "read", "uri_for"])
def test_store_lookups_reject_bad_ids(store: LocalArtifactStore, method: str, artifact_id: str) -> None:
    with pytest.raises(InvalidArtifactId):
        getattr(store, method)(artifact_id)


@pytest.mark.parametrize("name", BAD_NAMES + RESERVED_NAMES)
def test_put_rejects_bad_names_and_writes_nothing(tmp_path: Path, store: LocalArtifactStore, name: str) -> None:
    with pytest.raises(InvalidArtifactId):
        store.put(JOB, name, b"data", media_type="text/plain")
    assert all_files(tmp_path) == []


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_put_and_delete_job_reject_bad_job_ids(tmp_path: Path, store: LocalArtifactStore, job_id: str) -> None:
    (tmp_path / "keep.txt").write_text("keep")
    with pytest.raises(InvalidArtifactId):
        store.put(job_id, "x.bin", b"data", media_type="application/octet-stream")
    with pytest.raises(InvalidArtifactId):
        store.delete_job(job_id)
    assert all_files(tmp_path) == ["keep.txt"]


# ---- round trip --------------------------------------------------------------------------


def test_put_get_read_round_trip(tmp_path: Path, store: LocalArtifactStore) -> None:
    data = os.urandom(10_000)
    before = time.time()
    put = store.put(JOB, "image.png", data, media_type="image/png", metadata={"seed": "42", "w": "512"})
    after = time.time()

    path = (tmp_path / "out" / JOB / "image.png").resolve()
    expected = StoredArtifact(
        id=f"{JOB}/image.png",
        job_id=JOB,
        name="image.png",
        media_type="image/png",
        size_bytes=10_000,
        sha256=hashlib.sha256(data).hexdigest(),
        uri=path.as_uri(),
        created_at=put.created_at,
        metadata={"seed": "42", "w": "512"},
    )
    assert put == expected
    assert before <= put.created_at <= after
    assert put.uri.startswith("file:///")
    assert store.get(f"{JOB}/image.png") == expected
    assert store.read(f"{JOB}/image.png") == data
    assert path.read_bytes() == data

    meta = json.loads((path.parent / "image.png.meta.json").read_text())
    assert meta == {
        "id": f"{JOB}/image.png",
        "media_type": "image/png",
        "size_bytes": 10_000,
        "sha256": expected.sha256,
        "created_at": put.created_at,
        "metadata": {"seed": "42", "w": "512"},
    }
    # Nothing but the artifact and its commit marker: no temp files left behind.
    assert all_files(tmp_path / "out") == [f"{JOB}/image.png", f"{JOB}/image.png.meta.json"]


def test_put_without_metadata_and_overwrite(store: LocalArtifactStore) -> None:
    store.put(JOB, "a.txt", b"first", media_type="text/plain", metadata={"k": "v"})
    second = store.put(JOB, "a.txt", b"second!", media_type="text/markdown")
    got = store.get(f"{JOB}/a.txt")
    assert got == second
    assert (got.size_bytes, got.media_type, got.metadata) == (7, "text/markdown", {})
    assert store.read(f"{JOB}/a.txt") == b"second!"


def test_empty_artifact(store: LocalArtifactStore) -> None:
    put = store.put(JOB, "empty", b"", media_type="application/octet-stream")
    assert put.size_bytes == 0
    assert put.sha256 == hashlib.sha256(b"").hexdigest()
    assert store.read(f"{JOB}/empty") == b""


def test_public_base_url(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path, public_base_url="https://cdn.example.com/kiln/")
    put = store.put(JOB, "mesh.glb", b"glb", media_type="model/gltf-binary")
    assert put.uri == f"https://cdn.example.com/kiln/{JOB}/mesh.glb"
    assert store.get(f"{JOB}/mesh.glb").uri == put.uri
    assert store.uri_for(f"{OTHER_JOB}/x.bin") == f"https://cdn.example.com/kiln/{OTHER_JOB}/x.bin"


def test_no_server_paths_unless_asked(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    assert store.put(JOB, "mesh.glb", b"glb", media_type="model/gltf-binary").uri == ""
    assert store.get(f"{JOB}/mesh.glb").uri == ""


def test_signed_public_links(tmp_path: Path) -> None:
    signer = UrlSigner(b"k" * 32, expiry_s=60)
    store = LocalArtifactStore(tmp_path, public_base_url="https://kiln.example/v1/artifacts/", signer=signer)
    uri = store.put(JOB, "mesh.glb", b"glb", media_type="model/gltf-binary").uri
    parsed = urllib.parse.urlsplit(uri)
    assert f"{parsed.scheme}://{parsed.netloc}{parsed.path}" == f"https://kiln.example/v1/artifacts/{JOB}/mesh.glb"
    query = dict(urllib.parse.parse_qsl(parsed.query))
    assert int(query["expires"]) > time.time()
    signer.check(f"{JOB}/mesh.glb", int(query["expires"]), query["signature"])


def test_local_store_satisfies_the_protocol(store: LocalArtifactStore) -> None:
    assert isinstance(store, ArtifactStore)


def test_missing_artifacts_are_not_found(tmp_path: Path, store: LocalArtifactStore) -> None:
    for artifact_id in (f"{JOB}/nope.bin", f"{OTHER_JOB}/nope.bin"):
        with pytest.raises(ArtifactNotFound):
            store.get(artifact_id)
        with pytest.raises(ArtifactNotFound):
            store.read(artifact_id)
    # A file where a job folder should be is not a job either.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / JOB).write_bytes(b"not a dir")
    with pytest.raises(ArtifactNotFound):
        store.get(f"{JOB}/x")


def test_data_without_metadata_is_not_an_artifact(tmp_path: Path, store: LocalArtifactStore) -> None:
    (tmp_path / "out" / JOB).mkdir(parents=True)
    (tmp_path / "out" / JOB / "x.bin").write_bytes(b"half-written")
    with pytest.raises(ArtifactNotFound):
        store.get(f"{JOB}/x.bin")
    with pytest.raises(ArtifactNotFound):
        store.read(f"{JOB}/x.bin")


def test_metadata_without_data_is_not_an_artifact(store: LocalArtifactStore) -> None:
    store.put(JOB, "x.bin", b"data", media_type="application/octet-stream")
    (store.root / JOB / "x.bin").unlink()
    with pytest.raises(ArtifactNotFound):
        store.get(f"{JOB}/x.bin")
    with pytest.raises(ArtifactNotFound):
        store.read(f"{JOB}/x.bin")


def test_delete_job_is_idempotent_and_scoped(store: LocalArtifactStore) -> None:
    store.put(JOB, "a", b"a", media_type="text/plain")
    store.put(JOB, "b", b"b", media_type="text/plain")
    store.put(OTHER_JOB, "a", b"other", media_type="text/plain")
    store.delete_job(JOB)
    assert not (store.root / JOB).exists()
    with pytest.raises(ArtifactNotFound):
        store.get(f"{JOB}/a")
    store.delete_job(JOB)
    store.delete_job(new_job_id())  # never existed
    assert store.read(f"{OTHER_JOB}/a") == b"other"


# ---- crashes -----------------------------------------------------------------------------


def failing_on_call(real: Callable[..., Any], fail_on: int) -> Callable[..., Any]:
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == fail_on:
            raise OSError("simulated crash")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("func", ["replace", "fsync"])
def test_crash_writing_data_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, store: LocalArtifactStore, func: str
) -> None:
    monkeypatch.setattr(os, func, failing_on_call(getattr(os, func), fail_on=1))
    with pytest.raises(OSError, match="simulated crash"):
        store.put(JOB, "x.bin", b"data" * 1000, media_type="application/octet-stream")
    monkeypatch.undo()
    # The job folder was made, but it holds no final file and no temp file.
    assert all_files(store.root) == []
    with pytest.raises(ArtifactNotFound):
        store.get(f"{JOB}/x.bin")
    with pytest.raises(ArtifactNotFound):
        store.read(f"{JOB}/x.bin")


def test_crash_before_metadata_commit(monkeypatch: pytest.MonkeyPatch, store: LocalArtifactStore) -> None:
    store.put(JOB, "keep.bin", b"committed", media_type="application/octet-stream")
    monkeypatch.setattr(os, "replace", failing_on_call(os.replace, fail_on=2))
    with pytest.raises(OSError, match="simulated crash"):
        store.put(JOB, "stray.bin", b"data", media_type="application/octet-stream")
    monkeypatch.undo()

    # The data made it to its final name, the commit marker did not, and no temp file is left.
    assert all_files(store.root) == [f"{JOB}/keep.bin", f"{JOB}/keep.bin.meta.json", f"{JOB}/stray.bin"]
    with pytest.raises(ArtifactNotFound):
        store.get(f"{JOB}/stray.bin")
    with pytest.raises(ArtifactNotFound):
        store.read(f"{JOB}/stray.bin")

    # A fresh stray may be a put in progress, so it stays; an old one goes, the job stays.
    assert store.cleanup(3600) == 0
    assert (store.root / JOB / "stray.bin").exists()
    old = time.time() - 7200
    os.utime(store.root / JOB / "stray.bin", (old, old))
    assert store.cleanup(3600) == 0
    assert all_files(store.root) == [f"{JOB}/keep.bin", f"{JOB}/keep.bin.meta.json"]
    assert store.read(f"{JOB}/keep.bin") == b"committed"


# ---- symlinks ----------------------------------------------------------------------------


def test_symlinked_file_pointing_outside_is_not_followed(tmp_path: Path, store: LocalArtifactStore) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    (tmp_path / "secret.meta.json").write_text(
        json.dumps({"media_type": "text/plain", "size_bytes": 6, "sha256": "0" * 64, "created_at": 0, "metadata": {}})
    )
    store.put(JOB, "real.bin", b"real", media_type="text/plain")
    (store.root / JOB / "leak").symlink_to(outside)
    (store.root / JOB / "leak.meta.json").symlink_to(tmp_path / "secret.meta.json")
    # Even a real commit marker does not make a symlinked data file readable.
    (store.root / JOB / "leak2").symlink_to(outside)
    (store.root / JOB / "leak2.meta.json").write_text((store.root / JOB / "real.bin.meta.json").read_text())
    for name in ("leak", "leak2"):
        with pytest.raises(InvalidArtifactId):
            store.get(f"{JOB}/{name}")
        with pytest.raises(InvalidArtifactId):
            store.read(f"{JOB}/{name}")


def test_symlinked_job_folder_pointing_outside_is_not_followed(tmp_path: Path, store: LocalArtifactStore) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    scratch = LocalArtifactStore(outside)
    scratch.put(JOB, "x.bin", b"outside", media_type="text/plain")
    store.root.mkdir()
    (store.root / JOB).symlink_to(outside / JOB, target_is_directory=True)

    with pytest.raises(InvalidArtifactId):
        store.get(f"{JOB}/x.bin")
    with pytest.raises(InvalidArtifactId):
        store.read(f"{JOB}/x.bin")
    with pytest.raises(InvalidArtifactId):
        store.put(JOB, "y.bin", b"escape", media_type="text/plain")
    with pytest.raises(InvalidArtifactId):
        store.delete_job(JOB)
    # cleanup does not descend into it either.
    assert store.cleanup(0, now=time.time() + 3600) == 0
    assert all_files(outside) == [f"{JOB}/x.bin", f"{JOB}/x.bin.meta.json"]


def test_root_behind_a_symlink_works(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    store = LocalArtifactStore(tmp_path / "link")
    put = store.put(JOB, "x.bin", b"x", media_type="text/plain")
    assert store.read(put.id) == b"x"
    assert (tmp_path / "real" / JOB / "x.bin").read_bytes() == b"x"


# ---- cleanup -----------------------------------------------------------------------------


def age(path: Path, seconds: float) -> None:
    """Make `path` and everything under it look `seconds` old."""
    then = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (then, then), follow_symlinks=False)


def test_cleanup_removes_only_old_jobs(store: LocalArtifactStore) -> None:
    store.put(JOB, "a.bin", b"old", media_type="text/plain")
    store.put(JOB, "b.bin", b"old", media_type="text/plain")
    store.put(OTHER_JOB, "a.bin", b"new", media_type="text/plain")
    age(store.root / JOB, 7200)

    assert store.cleanup(3600) == 1
    assert not (store.root / JOB).exists()
    assert store.read(f"{OTHER_JOB}/a.bin") == b"new"
    assert store.cleanup(3600) == 0


def test_cleanup_keeps_a_job_with_any_recent_artifact(store: LocalArtifactStore) -> None:
    store.put(JOB, "old.bin", b"old", media_type="text/plain")
    age(store.root / JOB, 7200)
    store.put(JOB, "new.bin", b"new", media_type="text/plain")
    assert store.cleanup(3600) == 0
    assert store.read(f"{JOB}/old.bin") == b"old"


def test_cleanup_with_explicit_now(store: LocalArtifactStore) -> None:
    store.put(JOB, "a.bin", b"a", media_type="text/plain")
    store.put(OTHER_JOB, "a.bin", b"a", media_type="text/plain")
    assert store.cleanup(60, now=time.time()) == 0
    assert store.cleanup(60, now=time.time() + 120) == 2
    assert all_files(store.root) == []


def test_cleanup_removes_old_temp_files_only(store: LocalArtifactStore) -> None:
    store.put(JOB, "a.bin", b"a", media_type="text/plain")
    job_dir = store.root / JOB
    (job_dir / ".old123.tmp").write_bytes(b"partial")
    (job_dir / ".new456.tmp").write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(job_dir / ".old123.tmp", (old, old))

    assert store.cleanup(3600) == 0
    assert all_files(store.root) == [f"{JOB}/.new456.tmp", f"{JOB}/a.bin", f"{JOB}/a.bin.meta.json"]


def test_cleanup_removes_an_old_job_that_never_committed(store: LocalArtifactStore) -> None:
    job_dir = store.root / JOB
    job_dir.mkdir(parents=True)
    (job_dir / "stray.bin").write_bytes(b"x")
    (job_dir / ".abc.tmp").write_bytes(b"x")
    (store.root / OTHER_JOB).mkdir()  # just made by a put that is about to write: kept
    age(job_dir, 7200)
    assert store.cleanup(3600) == 1
    assert sorted(p.name for p in store.root.iterdir()) == [OTHER_JOB]


def test_cleanup_leaves_foreign_entries_alone(store: LocalArtifactStore) -> None:
    store.root.mkdir()
    (store.root / "notes").mkdir()
    (store.root / "notes" / "x.txt").write_text("x")
    (store.root / JOB.lower()).mkdir()
    (store.root / "file.tmp").write_text("x")
    age(store.root, 7200)
    assert store.cleanup(3600) == 0
    assert all_files(store.root) == ["file.tmp", "notes/x.txt"]
    assert (store.root / JOB.lower()).is_dir()


def test_cleanup_on_empty_or_missing_root(tmp_path: Path) -> None:
    missing = LocalArtifactStore(tmp_path / "missing")
    assert missing.cleanup(0, now=time.time() + 10) == 0
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    assert LocalArtifactStore(tmp_path / "empty").cleanup(0, now=time.time() + 10) == 0


# ---- concurrency -------------------------------------------------------------------------


def test_concurrent_puts(store: LocalArtifactStore) -> None:
    jobs = [new_job_id() for _ in range(8)]
    payloads = {(job, i): os.urandom(64 * 1024 + i) for job in jobs for i in range(10)}
    start = threading.Barrier(len(jobs))

    def worker(job: str) -> list[StoredArtifact]:
        start.wait()
        return [store.put(job, f"part-{i}.bin", payloads[job, i], media_type="text/plain") for i in range(10)]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = [a for batch in pool.map(worker, jobs) for a in batch]

    assert len(results) == 80
    for (job, i), data in payloads.items():
        artifact_id = f"{job}/part-{i}.bin"
        assert store.read(artifact_id) == data
        assert store.get(artifact_id).sha256 == hashlib.sha256(data).hexdigest()
    assert len(all_files(store.root)) == 160  # no temp files left


def test_chunks_stream_a_range_in_pieces(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    job = new_job_id()
    data = bytes(range(256)) * 40  # 10240 bytes
    stored = store.put(job, "mesh.glb", data, media_type="model/gltf-binary")
    pieces = list(store.chunks(stored.id, chunk_bytes=4096))
    assert [len(p) for p in pieces] == [4096, 4096, 2048]
    assert b"".join(pieces) == data
    assert b"".join(store.chunks(stored.id, chunk_bytes=1000, start=100, stop=2600)) == data[100:2600]
    assert list(store.chunks(stored.id, chunk_bytes=10, start=len(data))) == []
    with pytest.raises(ArtifactNotFound):
        next(store.chunks(f"{job}/other.glb", chunk_bytes=10))
    with pytest.raises(ValueError, match="bad range"):
        next(store.chunks(stored.id, chunk_bytes=0))

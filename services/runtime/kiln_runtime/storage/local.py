"""Artifacts as plain files under one output directory, for single-host deployments and tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kiln_runtime.signing import UrlSigner
from kiln_runtime.storage.base import (
    ArtifactNotFound,
    InvalidArtifactId,
    StoredArtifact,
    validate_artifact_id,
    validate_artifact_name,
    validate_job_id,
)

_META_SUFFIX = ".meta.json"
_TMP_SUFFIX = ".tmp"


class LocalArtifactStore:
    """Stores `<root>/<job_id>/<name>` with a `<name>.meta.json` beside it that commits the write.

    Writes go to a temp file that is renamed into place, data first and metadata last, so a
    crash leaves either the old state or a stray file that readers ignore and `cleanup` removes.

    URIs: with `public_base_url`, `<public_base_url>/<artifact id>` (signed by `signer` if given);
    else `file://` paths only if `local_path_uris` (they name this server's folder, which no
    client elsewhere should learn), and otherwise none: clients download by artifact id.
    """

    def __init__(
        self,
        root: Path,
        *,
        public_base_url: str = "",
        signer: UrlSigner | None = None,
        local_path_uris: bool = False,
    ) -> None:
        # Resolved once, so the containment checks compare against the real directory even
        # when the configured path runs through a symlink.
        self._root = Path(root).resolve()
        self._public_base_url = public_base_url.rstrip("/")
        self._signer = signer
        self._local_path_uris = local_path_uris

    @property
    def root(self) -> Path:
        return self._root

    @property
    def signer(self) -> UrlSigner | None:
        """The signer of this store's links, which the artifact service checks them with."""
        return self._signer

    def put(
        self, job_id: str, name: str, data: bytes, *, media_type: str, metadata: Mapping[str, str] | None = None
    ) -> StoredArtifact:
        artifact_id = f"{validate_job_id(job_id)}/{validate_artifact_name(name)}"
        data_path, meta_path = self._paths(job_id, name)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        artifact = StoredArtifact.describe(
            artifact_id, data, media_type=media_type, uri=self.uri_for(artifact_id), metadata=metadata
        )
        _write_atomically(data_path, data)
        _write_atomically(meta_path, artifact.commit_record())
        # Without this the renames may not survive a power cut even though the data would.
        _fsync_dir(data_path.parent)
        return artifact

    def get(self, artifact_id: str) -> StoredArtifact:
        job_id, name = validate_artifact_id(artifact_id)
        _, meta = self._committed(job_id, name)
        return StoredArtifact.from_record(artifact_id, meta, uri=self.uri_for(artifact_id))

    def read(self, artifact_id: str) -> bytes:
        job_id, name = validate_artifact_id(artifact_id)
        data_path, _ = self._committed(job_id, name)
        try:
            return data_path.read_bytes()
        except FileNotFoundError:  # deleted between the check and the read
            raise ArtifactNotFound(artifact_id) from None

    def chunks(self, artifact_id: str, *, chunk_bytes: int, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        if chunk_bytes <= 0 or start < 0 or (stop is not None and stop < start):
            raise ValueError(f"bad range: chunk_bytes={chunk_bytes}, start={start}, stop={stop}")
        job_id, name = validate_artifact_id(artifact_id)
        data_path, _ = self._committed(job_id, name)
        try:
            file = data_path.open("rb")
        except FileNotFoundError:  # deleted between the check and the open
            raise ArtifactNotFound(artifact_id) from None
        # The open file keeps its bytes readable even if cleanup removes it meanwhile.
        with file:
            file.seek(start)
            remaining = None if stop is None else stop - start
            while remaining is None or remaining > 0:
                piece = file.read(chunk_bytes if remaining is None else min(chunk_bytes, remaining))
                if not piece:
                    return
                if remaining is not None:
                    remaining -= len(piece)
                yield piece

    def delete_job(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._job_dir(validate_job_id(job_id)))

    def job_ids(self) -> list[str]:
        try:
            entries = list(os.scandir(self._root))
        except FileNotFoundError:
            return []
        return [entry.name for entry in entries if entry.is_dir(follow_symlinks=False) and _is_job_id(entry.name)]

    def cleanup(self, older_than_s: float, *, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - older_than_s
        try:
            entries = list(os.scandir(self._root))
        except FileNotFoundError:
            return 0
        removed = 0
        for entry in entries:
            # Only folders this store could have made; anything else under root is not ours.
            is_job = entry.is_dir(follow_symlinks=False) and _is_job_id(entry.name)
            if is_job and _cleanup_job(Path(entry.path), cutoff):
                removed += 1
        return removed

    def uri_for(self, artifact_id: str) -> str:
        job_id, name = validate_artifact_id(artifact_id)
        data_path, _ = self._paths(job_id, name)  # refuses reserved names and planted links alike
        if self._public_base_url:
            if self._signer is not None:
                return self._signer.link(self._public_base_url, artifact_id)
            return f"{self._public_base_url}/{artifact_id}"
        return data_path.as_uri() if self._local_path_uris else ""

    def _job_dir(self, job_id: str) -> Path:
        path = self._root / job_id
        # The ids are already validated; this catches symlinks planted inside root. The store
        # never makes links, so any path that resolves elsewhere is refused outright.
        if path.resolve() != path:
            raise InvalidArtifactId(f"job {job_id!r} does not resolve inside the artifact directory")
        return path

    def _paths(self, job_id: str, name: str) -> tuple[Path, Path]:
        # These names are the store's own bookkeeping; letting callers use them would let one
        # artifact overwrite another's commit marker.
        if name.endswith((_META_SUFFIX, _TMP_SUFFIX)):
            raise InvalidArtifactId(f"artifact name {name!r} is reserved")
        job_dir = self._job_dir(job_id)
        paths = (job_dir / name, job_dir / f"{name}{_META_SUFFIX}")
        for path in paths:
            if path.resolve() != path:
                raise InvalidArtifactId(f"artifact {job_id}/{name} does not resolve inside the artifact directory")
        return paths

    def _committed(self, job_id: str, name: str) -> tuple[Path, dict[str, Any]]:
        """The data path and parsed metadata, if the metadata (the commit marker) and data both exist."""
        data_path, meta_path = self._paths(job_id, name)
        try:
            meta: dict[str, Any] = json.loads(meta_path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactNotFound(f"{job_id}/{name}") from None
        if not data_path.is_file():
            raise ArtifactNotFound(f"{job_id}/{name}")
        return data_path, meta


def _is_job_id(name: str) -> bool:
    try:
        validate_job_id(name)
    except InvalidArtifactId:
        return False
    return True


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; artifacts are meant to be served, e.g. by a static
            # file server running as another user.
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cleanup_job(job_dir: Path, cutoff: float) -> bool:
    """Remove the job folder if nothing in it is newer than `cutoff`, else just its stale leftovers.

    Returns whether the folder was removed.
    """
    try:
        entries = list(os.scandir(job_dir))
        mtimes = {e.name: e.stat(follow_symlinks=False).st_mtime for e in entries}
        # The folder's own mtime counts too, so a folder a put has just made, still empty, survives.
        newest = max([job_dir.lstat().st_mtime, *mtimes.values()])
    except FileNotFoundError:  # deleted meanwhile
        return False
    if newest < cutoff:
        try:
            shutil.rmtree(job_dir)
        except FileNotFoundError:
            return False
        return True
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) or mtimes[entry.name] >= cutoff:
            continue
        name = entry.name
        temp = name.startswith(".") and name.endswith(_TMP_SUFFIX)
        # Data renamed into place whose metadata never followed: a put that died midway.
        uncommitted = (
            not name.startswith(".") and not name.endswith(_META_SUFFIX) and f"{name}{_META_SUFFIX}" not in mtimes
        )
        if temp or uncommitted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    return False

"""Artifacts in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, R2, GCS interop), for clusters.

Every replica reaches the same bucket, so any server can serve any job's artifacts and clients
download them straight from the store through presigned URLs. The layout mirrors the local
backend: `<prefix><job_id>/<name>` holds the data and `<prefix><job_id>/<name>.meta.json` the
metadata, written last as the commit marker, so an artifact is complete or absent. Big artifacts
go up as multipart uploads, which S3 never shows until they complete; an upload that dies midway
is aborted (or, after a crash, aborted by `cleanup`).

boto3 is synchronous; every call here runs in a worker thread, as the local backend's file I/O does.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import boto3
import grpc
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from kiln_runtime.errors import KilnError
from kiln_runtime.signing import UrlSigner
from kiln_runtime.storage.base import (
    ArtifactNotFound,
    InvalidArtifactId,
    StoredArtifact,
    validate_artifact_id,
    validate_artifact_name,
    validate_job_id,
)

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client
    from types_boto3_s3.type_defs import LifecycleRuleTypeDef

_META_SUFFIX = ".meta.json"
#: Objects a ranged read asks for at a time: big enough that a 100 MB artifact is a dozen GETs,
#: small enough that a slow reader never keeps one response open for minutes.
_READ_WINDOW_BYTES = 8 << 20
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class StorageUnavailable(KilnError):
    """The object store cannot be used: unreachable, credentials refused, or no such bucket.

    UNAVAILABLE: the job did not fail for anything in the request, and the store may be back soon.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORAGE_UNAVAILABLE"


class S3ArtifactStore:
    """Stores `<prefix><job_id>/<name>` plus a `<name>.meta.json` commit marker in one bucket.

    Args:
        bucket: An existing bucket.
        prefix: Key prefix for everything Kiln writes ("" or ending in "/").
        endpoint_url: The service's endpoint; empty for AWS S3.
        region: Signing region.
        path_style: Path-style addressing (MinIO, SeaweedFS) instead of virtual-hosted buckets.
        presign_expiry_s: Lifetime of the presigned GET URLs returned as artifact URIs.
        public_endpoint_url: Endpoint the presigned URLs name when clients reach the store at
            another address than this server does; empty: `endpoint_url`.
        public_base_url: If set, URIs are `<public_base_url>/<artifact id>` instead of presigned URLs:
            signed links (`signer`) on the gateway's artifact route, or plain URLs without a signer (a
            public bucket or a CDN in front of the prefix).
        multipart_threshold_bytes: Artifacts at least this large are uploaded in parts.
        part_bytes: Size of each part.
        signer: Signs the `public_base_url` links (kiln_runtime.signing).
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str = "",
        region: str = "us-east-1",
        path_style: bool = True,
        presign_expiry_s: int = 3600,
        public_endpoint_url: str = "",
        public_base_url: str = "",
        multipart_threshold_bytes: int = 16 << 20,
        part_bytes: int = 8 << 20,
        signer: UrlSigner | None = None,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self._presign_expiry_s = presign_expiry_s
        self._public_base_url = public_base_url.rstrip("/")
        self._signer = signer
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            # botocore's newer default checksums (CRC32 trailers) are refused by several
            # S3-compatible services (GCS interop, older MinIO); the SHA-256 in the metadata
            # object is Kiln's own integrity check.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # One session per store: boto3's default session is shared global state, clients are
        # thread-safe. Credentials come from the standard chain and are never logged here.
        session = boto3.session.Session()
        self._client: S3Client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        # Presigning is local signing; a URL must name the host clients use, which SigV4 signs.
        self._presigner: S3Client = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self._client
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes, multipart_chunksize=part_bytes, max_concurrency=4
        )

    @property
    def signer(self) -> UrlSigner | None:
        """The signer of this store's links, which the artifact service checks them with."""
        return self._signer

    @property
    def client(self) -> S3Client:
        """The boto3 client (tests and maintenance tasks reach the bucket with it)."""
        return self._client

    # -- the ArtifactStore protocol -----------------------------------------------------------

    def put(
        self, job_id: str, name: str, data: bytes, *, media_type: str, metadata: Mapping[str, str] | None = None
    ) -> StoredArtifact:
        artifact_id = self._artifact_id(job_id, name)
        data_key, meta_key = self._keys(artifact_id)
        artifact = StoredArtifact.describe(
            artifact_id, data, media_type=media_type, uri=self.uri_for(artifact_id), metadata=metadata
        )
        # s3transfer switches to a multipart upload above the threshold and aborts it when a
        # part fails, so a failed put leaves no object and no parts behind.
        self._call(
            "upload",
            self._client.upload_fileobj,
            # BytesIO shares the bytes object's buffer until written to: no copy of a 100 MB mesh.
            io.BytesIO(data),
            self.bucket,
            data_key,
            ExtraArgs={"ContentType": media_type},
            Config=self._transfer,
        )
        # The commit marker, written only once the data object exists in full.
        self._call(
            "commit",
            self._client.put_object,
            Bucket=self.bucket,
            Key=meta_key,
            Body=artifact.commit_record(),
            ContentType="application/json",
        )
        return artifact

    def get(self, artifact_id: str) -> StoredArtifact:
        validate_artifact_id(artifact_id)
        meta = self._committed(artifact_id)
        return StoredArtifact.from_record(artifact_id, meta, uri=self.uri_for(artifact_id))

    def read(self, artifact_id: str) -> bytes:
        return b"".join(self.chunks(artifact_id, chunk_bytes=_READ_WINDOW_BYTES))

    def chunks(self, artifact_id: str, *, chunk_bytes: int, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        if chunk_bytes <= 0 or start < 0 or (stop is not None and stop < start):
            raise ValueError(f"bad range: chunk_bytes={chunk_bytes}, start={start}, stop={stop}")
        validate_artifact_id(artifact_id)
        meta = self._committed(artifact_id)
        data_key, _ = self._keys(artifact_id)
        size = int(meta["size_bytes"])
        end = size if stop is None else min(stop, size)
        window = max(chunk_bytes, _READ_WINDOW_BYTES)
        etag: str | None = None
        position = start
        while position < end:
            last = min(position + window, end) - 1
            # If-Match on every window after the first: a put replacing the object mid-read
            # must end the read, not splice two versions together.
            extra: dict[str, Any] = {"IfMatch": etag} if etag else {}
            response = self._get_object(artifact_id, data_key, Range=f"bytes={position}-{last}", **extra)
            etag = etag or response["ETag"]
            body = response["Body"]
            try:
                for piece in body.iter_chunks(chunk_bytes):
                    position += len(piece)
                    yield piece
            finally:
                body.close()
            if position <= last:  # the object is shorter than its metadata says: not ours to serve
                raise ArtifactNotFound(f"{artifact_id} changed while it was being read")

    def delete_job(self, job_id: str) -> None:
        validate_job_id(job_id)
        keys = [obj["Key"] for obj in self._objects(f"{self.prefix}{job_id}/")]
        # Commit markers first: an artifact disappears as a whole before its data goes.
        self._delete([k for k in keys if k.endswith(_META_SUFFIX)])
        self._delete([k for k in keys if not k.endswith(_META_SUFFIX)])
        self._abort_uploads(f"{self.prefix}{job_id}/", cutoff=math.inf)

    def job_ids(self) -> list[str]:
        # From the objects, not from delimiter prefixes: some servers (SeaweedFS) keep an emptied
        # "folder" as a prefix after its objects are deleted.
        ids = set()
        for obj in self._objects(self.prefix):
            job_id, _, name = obj["Key"][len(self.prefix) :].partition("/")
            if name and _is_job_id(job_id):
                ids.add(job_id)
        return list(ids)

    def cleanup(self, older_than_s: float, *, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - older_than_s
        jobs: dict[str, dict[str, float]] = defaultdict(dict)
        for obj in self._objects(self.prefix):
            job_id, _, name = obj["Key"][len(self.prefix) :].partition("/")
            if _is_job_id(job_id) and name:  # only keys this store could have written
                jobs[job_id][name] = obj["LastModified"].timestamp()
        removed = 0
        for job_id, names in jobs.items():
            if max(names.values()) < cutoff:
                self.delete_job(job_id)
                removed += 1
                continue
            # Data whose commit marker never followed (a put that died between the two): stale
            # once older than the cutoff, like the local backend's leftovers.
            stale = [
                f"{self.prefix}{job_id}/{name}"
                for name, modified in names.items()
                if not name.endswith(_META_SUFFIX) and f"{name}{_META_SUFFIX}" not in names and modified < cutoff
            ]
            self._delete(stale)
        # Parts of uploads that never completed (a crashed put) cost storage but are never listed.
        self._abort_uploads(self.prefix, cutoff=cutoff)
        return removed

    def uri_for(self, artifact_id: str) -> str:
        validate_artifact_id(artifact_id)
        if self._public_base_url:
            if self._signer is not None:
                return self._signer.link(self._public_base_url, artifact_id)
            return f"{self._public_base_url}/{artifact_id}"
        data_key, _ = self._keys(artifact_id)
        url: str = self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": data_key}, ExpiresIn=self._presign_expiry_s
        )
        return url

    def close(self) -> None:
        """Close the clients' connection pools."""
        self._client.close()
        if self._presigner is not self._client:
            self._presigner.close()

    # -- startup -------------------------------------------------------------------------------

    def check(self) -> None:
        """Fail with a readable reason unless the bucket is reachable with these credentials.

        Raises:
            StorageUnavailable: naming what is wrong and the setting or variable to change.
        """
        where = f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageUnavailable(
                f"artifact storage: no S3 credentials for {where}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        except ClientError as err:
            code = _error_code(err)
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                reason = "the credentials were refused (HTTP 403); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            elif code in ("404", "NoSuchBucket", "NotFound"):
                reason = "there is no such bucket; create it or set KILN_STORAGE__S3__BUCKET"
            else:
                reason = f"the store answered {code}: {err}"
            raise StorageUnavailable(f"artifact storage: {where}: {reason}") from None
        except BotoCoreError as err:
            raise StorageUnavailable(
                f"artifact storage: cannot reach {where}: {err}; check KILN_STORAGE__S3__ENDPOINT_URL"
            ) from None

    def apply_lifecycle(self, retention_hours: float) -> None:
        """Let the store expire Kiln's objects itself, as a backstop for `cleanup`.

        Replaces the bucket's lifecycle configuration with one rule for the prefix: objects expire
        after `retention_hours` rounded up to whole days (S3's unit), and incomplete multipart
        uploads are aborted after a day.
        """
        rule: LifecycleRuleTypeDef = {
            "ID": "kiln-artifact-retention",
            "Status": "Enabled",
            "Filter": {"Prefix": self.prefix},
            "Expiration": {"Days": max(1, math.ceil(retention_hours / 24))},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
        self._client.put_bucket_lifecycle_configuration(Bucket=self.bucket, LifecycleConfiguration={"Rules": [rule]})

    # -- helpers -------------------------------------------------------------------------------

    def _artifact_id(self, job_id: str, name: str) -> str:
        validate_job_id(job_id)
        validate_artifact_name(name)
        # The store's own bookkeeping name; an artifact called that would overwrite another's marker.
        if name.endswith(_META_SUFFIX):
            raise InvalidArtifactId(f"artifact name {name!r} is reserved")
        return f"{job_id}/{name}"

    def _keys(self, artifact_id: str) -> tuple[str, str]:
        job_id, name = validate_artifact_id(artifact_id)
        self._artifact_id(job_id, name)
        key = f"{self.prefix}{artifact_id}"
        return key, f"{key}{_META_SUFFIX}"

    def _committed(self, artifact_id: str) -> dict[str, Any]:
        """The parsed commit marker; raises ArtifactNotFound if the artifact was never committed."""
        _, meta_key = self._keys(artifact_id)
        response = self._get_object(artifact_id, meta_key)
        with response["Body"] as body:
            meta: dict[str, Any] = json.loads(body.read())
        return meta

    def _get_object(self, artifact_id: str, key: str, **extra: Any) -> Any:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key, **extra)
        except ClientError as err:
            code = _error_code(err)
            if code in _NOT_FOUND_CODES:
                raise ArtifactNotFound(artifact_id) from None
            if code in ("PreconditionFailed", "412"):
                raise ArtifactNotFound(f"{artifact_id} changed while it was being read") from None
            raise StorageUnavailable(f"artifact storage: reading {key}: {err}") from err
        except BotoCoreError as err:
            raise StorageUnavailable(f"artifact storage: reading {key}: {err}") from err

    def _objects(self, prefix: str) -> Iterator[Any]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in self._call("list", paginator.paginate, Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _delete(self, keys: list[str]) -> None:
        for first in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            batch = [{"Key": key} for key in keys[first : first + 1000]]
            self._call("delete", self._client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})

    def _abort_uploads(self, prefix: str, *, cutoff: float) -> None:
        paginator = self._client.get_paginator("list_multipart_uploads")
        for page in self._call("list uploads", paginator.paginate, Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    self._call(
                        "abort upload",
                        self._client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one boto3 call, turning its failures into StorageUnavailable with the operation named."""
        try:
            return function(*args, **kwargs)
        except (ClientError, BotoCoreError) as err:
            raise StorageUnavailable(f"artifact storage: {what} in bucket {self.bucket!r} failed: {err}") from err


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _is_job_id(name: str) -> bool:
    try:
        validate_job_id(name)
    except InvalidArtifactId:
        return False
    return True

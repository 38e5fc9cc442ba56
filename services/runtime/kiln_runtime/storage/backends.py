"""Which `ArtifactStore` a server uses, from `KILN_STORAGE__BACKEND` and its section."""

from __future__ import annotations

from kiln_runtime.settings import StorageSettings
from kiln_runtime.signing import UrlSigner
from kiln_runtime.storage.base import ArtifactStore
from kiln_runtime.storage.local import LocalArtifactStore


def open_store(storage: StorageSettings, signer: UrlSigner | None = None) -> ArtifactStore:
    """Build the configured store; nothing is contacted yet (see `S3ArtifactStore.check`).

    `signer` signs the `public_base_url` links; None: the one `storage`'s settings make.
    """
    signer = signer or UrlSigner.from_settings(storage)
    if storage.backend == "s3":
        # Imported only when chosen: boto3 costs a few hundred ms at startup for local users.
        from kiln_runtime.storage.s3 import S3ArtifactStore

        s3 = storage.s3
        return S3ArtifactStore(
            bucket=s3.bucket,
            prefix=s3.prefix,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            path_style=s3.path_style,
            presign_expiry_s=s3.presign_expiry_s,
            public_endpoint_url=s3.public_endpoint_url,
            public_base_url=storage.public_base_url,
            multipart_threshold_bytes=s3.multipart_threshold_bytes,
            part_bytes=s3.part_bytes,
            signer=signer,
        )
    return LocalArtifactStore(
        storage.resolved_output_dir.resolve(),
        public_base_url=storage.public_base_url,
        signer=signer,
        local_path_uris=storage.local_path_uris,
    )

"""A real SeaweedFS per test module (credentials checked), and stores on it with their own prefix."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kiln_runtime.storage.s3 import S3ArtifactStore
from tests.s3.seaweed import SeaweedFS, start_seaweedfs

ACCESS_KEY = "kiln-test-key"
SECRET_KEY = "kiln-test-secret-0123456789"
BUCKET = "kiln-artifacts"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    weed = start_seaweedfs(
        tmp_path_factory.mktemp("seaweed") / "data", access_key=ACCESS_KEY, secret_key=SECRET_KEY, bucket=BUCKET
    )
    yield weed
    weed.stop()


def aws_environment(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
    """The standard AWS variables the store's credential chain reads; no config files, no IMDS."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = aws_environment()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


MakeStore = Callable[..., S3ArtifactStore]


@pytest.fixture
def make_store(seaweed: SeaweedFS, aws_env: dict[str, str]) -> Iterator[MakeStore]:
    """S3 stores on the module's SeaweedFS, each test under its own key prefix; closed afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}/"
    made: list[S3ArtifactStore] = []

    def make(**options: Any) -> S3ArtifactStore:
        settings: dict[str, Any] = {"bucket": BUCKET, "prefix": prefix, "endpoint_url": seaweed.endpoint, **options}
        made.append(S3ArtifactStore(**settings))
        return made[-1]

    yield make
    for store in made:
        store.close()


def keys(store: S3ArtifactStore, under: str = "") -> list[str]:
    """Every object key under the store's prefix, as the bucket lists them."""
    response = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}{under}")
    return sorted(obj["Key"][len(store.prefix) :] for obj in response.get("Contents", []))


def uploads(store: S3ArtifactStore) -> list[str]:
    """Keys of multipart uploads started under the store's prefix and not completed or aborted."""
    response = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    return [upload["Key"] for upload in response.get("Uploads", [])]

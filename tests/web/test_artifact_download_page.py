"""What a browser receives from `GET /v1/artifacts/...` through Envoy (the page's fallback for results
delivered by reference): the bytes of a large artifact, its length and media type, and a `Range`."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from kiln_runtime.storage import LocalArtifactStore, new_job_id
from tests.web.conftest import Tabs
from tests.web.stack import Stack

pytestmark = pytest.mark.timeout(180)

SIZE = 24 * 1000 * 1000  # several Envoy buffers and hundreds of pieces, still quick in a browser

FETCH = """
async (id) => {
  const url = `/v1/artifacts/${id}`;
  const whole = await fetch(url);
  const bytes = new Uint8Array(await whole.arrayBuffer());
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  const part = await fetch(url, { headers: { Range: "bytes=5-9" } });
  return {
    status: whole.status,
    type: whole.headers.get("content-type"),
    length: whole.headers.get("content-length"),
    received: bytes.length,
    sha256: Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join(""),
    partStatus: part.status,
    partRange: part.headers.get("content-range"),
    part: Array.from(new Uint8Array(await part.arrayBuffer())),
  };
}
"""


def test_browser_downloads_a_large_artifact_with_length_and_range(tabs: Tabs, stack: Stack) -> None:
    data = os.urandom(SIZE)
    # Written where the servers keep their artifacts, as a finished job would leave it.
    stored = LocalArtifactStore(stack.output_dir).put(new_job_id(), "big.glb", data, media_type="model/gltf-binary")
    tab = tabs.open()
    got: dict[str, Any] = tab.page.evaluate(FETCH, stored.id)
    assert got["status"] == 200
    assert got["type"] == "model/gltf-binary"
    assert got["length"] == str(SIZE)
    assert got["received"] == SIZE and got["sha256"] == hashlib.sha256(data).hexdigest()
    assert got["partStatus"] == 206
    assert got["partRange"] == f"bytes 5-9/{SIZE}"
    assert bytes(got["part"]) == data[5:10]

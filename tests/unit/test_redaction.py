"""No server folder in what clients read: model ids and messages lose their absolute paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.rpc import status_pb2

from kiln_runtime.model_source import public_model_id
from kiln_runtime.redaction import public_status, without_paths


@pytest.mark.parametrize(
    ("text", "public"),
    [
        (
            "no file named model_index.json in directory /srv/models/sd-x",
            "no file named model_index.json in directory sd-x",
        ),
        (
            "KILN_IMG2IMG__MODEL__ID='/opt/ann/m.safetensors' is neither",
            "KILN_IMG2IMG__MODEL__ID='m.safetensors' is neither",
        ),
        ("stored at file:///data/outputs/01J/image.png.", "stored at image.png."),
        ("(/var/lib/kiln/outputs/) is full", "(outputs) is full"),
        ("GET http://127.0.0.1:8080/v1/artifacts/x failed", "GET http://127.0.0.1:8080/v1/artifacts/x failed"),
        ("relative models/sd and owner/name stay", "relative models/sd and owner/name stay"),
        ("a lone / or /tmp is no folder of note", "a lone / or /tmp is no folder of note"),
    ],
)
def test_without_paths(text: str, public: str) -> None:
    assert without_paths(text) == public


def test_public_status_copies_only_when_it_must() -> None:
    clean = status_pb2.Status(code=9, message="the model is loading")
    assert public_status(clean) is clean
    leaky = status_pb2.Status(code=9, message="the model failed to load: /srv/models/sd-x is empty")
    public = public_status(leaky)
    assert public.message == "the model failed to load: sd-x is empty" and public.code == 9
    assert "/srv/models" in leaky.message, "the original (a recorded error) is left alone"


def test_model_ids(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert public_model_id(str(folder)) == "my-model"
    assert public_model_id(str(tmp_path / "sd.safetensors")) == "sd.safetensors"
    assert public_model_id("~/models/tiny") == "tiny"
    assert public_model_id("./tiny/") == "tiny"
    assert public_model_id("stabilityai/sd-turbo") == "stabilityai/sd-turbo"
    assert public_model_id("kiln/fake-img2img") == "kiln/fake-img2img"
    assert public_model_id("gemini-3-pro-image-preview") == "gemini-3-pro-image-preview"

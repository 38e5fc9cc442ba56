"""The tiny TripoSR checkpoint and u2net ONNX, generated once and reused between runs."""

from __future__ import annotations

import pytest
import torch

from kiln_mesh.testing.assets import TinyMeshModels, ensure_tiny_mesh_models


@pytest.fixture(scope="session")
def tiny_mesh() -> TinyMeshModels:
    return ensure_tiny_mesh_models()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    # Bytes are compared across runs: pin the reduction order.
    torch.set_num_threads(1)

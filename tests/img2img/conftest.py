"""Tiny SD1.5-shaped models in all three on-disk forms, generated once and reused between runs."""

from __future__ import annotations

import pytest
import torch

from kiln_img2img.testing.tiny_models import TinyModels, default_root, ensure_tiny_models


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    return ensure_tiny_models(default_root())


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    # Output bytes depend on the thread count (reduction order); pin it wherever bytes are compared.
    torch.set_num_threads(1)

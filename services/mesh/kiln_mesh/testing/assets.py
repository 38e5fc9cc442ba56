"""The tiny mesh models tests and `KILN_PROFILE=tiny` use: a TripoSR checkpoint and a u2net ONNX."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln_mesh.testing.tiny_triposr import default_tiny_root, ensure_tiny_triposr
from kiln_mesh.testing.u2net import write_tiny_u2net


@dataclass(frozen=True)
class TinyMeshModels:
    triposr_dir: Path  # config.yaml + vit_config.json + model.ckpt
    u2net_path: Path  # u2net-signature ONNX for rembg's u2net_custom session


def ensure_tiny_mesh_models(root: Path | None = None) -> TinyMeshModels:
    """Generate both once (reused between runs) and return where they are."""
    root = root or default_tiny_root()
    triposr_dir = ensure_tiny_triposr(root)
    u2net_path = root.parent / f"{root.name}-u2net.onnx"
    if not u2net_path.exists():
        # Written beside and renamed into place, so a reader never sees half a file.
        with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
            os.replace(write_tiny_u2net(Path(scratch) / "u2net.onnx"), u2net_path)
    return TinyMeshModels(triposr_dir=triposr_dir, u2net_path=u2net_path)

"""Loading a TripoSR folder (`config.yaml`, optional `vit_config.json`, `model.safetensors` or `model.ckpt`).

Keys must match the model exactly (the reference loads strictly too), and every shape
must agree; the error lists what differs. The model is built on the meta device, so the 420M
parameters are never randomly initialised; each checkpoint tensor is copied once, straight to the
target device and dtype, out of a memory-mapped file.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import torch
from safetensors import safe_open

from kiln_mesh.triposr.config import load_triposr_config
from kiln_mesh.triposr.model import TripoSR

__all__ = ["CKPT_FILE", "SAFETENSORS_FILE", "SUPPORTED_DTYPES", "CheckpointMismatch", "load_triposr"]

SAFETENSORS_FILE: Final = "model.safetensors"
CKPT_FILE: Final = "model.ckpt"
SUPPORTED_DTYPES: Final = (torch.float32, torch.float16, torch.bfloat16)
_LISTED: Final = 10


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not match the model built from the configuration.

    Attributes:
        missing: Keys the model has and the checkpoint lacks (sorted).
        unexpected: Keys the checkpoint has and the model lacks (sorted).
        mismatched: (key, checkpoint shape, model shape) for keys present in both with different shapes.
    """

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [f"{source} does not match the model built from its config:"]
        if missing:
            lines.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            shown = [f"{key} (checkpoint {list(got)}, model {list(want)})" for key, got, want in mismatched[:_LISTED]]
            more = f", ... and {len(mismatched) - _LISTED} more" if len(mismatched) > _LISTED else ""
            lines.append(f"{len(mismatched)} shape mismatch(es): {', '.join(shown)}{more}")
        super().__init__("\n".join(lines))


def _listing(keys: list[str]) -> str:
    more = f", ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_triposr(
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TripoSR:
    """Build TripoSR from a model folder and load its weights strictly.

    Args:
        folder: Holds `config.yaml`, optionally `vit_config.json`, and `model.safetensors` or `model.ckpt`
            (safetensors preferred when both exist).
        device: Where the model goes.
        dtype: Parameter dtype (float32, float16 or bfloat16); the checkpoint's float32 values are cast.

    Returns:
        The model in eval mode, parameters without gradients.

    Raises:
        FileNotFoundError: The config or both weight files are missing.
        CheckpointMismatch: Keys or shapes differ from the configured model.
        ValueError: The config is invalid, or the weight file is not a flat mapping of tensors.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported (float32, float16 or bfloat16)")
    folder = Path(folder)
    config = load_triposr_config(folder)
    with torch.device("meta"):
        model = TripoSR(config)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    target = torch.device(device)
    with _open_weights(folder) as (source, shapes, fetch):
        _check_keys(source, shapes, expected)
        state = {key: _converted(source, key, fetch(key), target, dtype) for key in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


_Fetch = Callable[[str], torch.Tensor]


@contextmanager
def _open_weights(folder: Path) -> Iterator[tuple[str, dict[str, tuple[int, ...]], _Fetch]]:
    """Yield (file name, key -> shape, key -> tensor) for the folder's weight file, read lazily."""
    safetensors_path, ckpt_path = folder / SAFETENSORS_FILE, folder / CKPT_FILE
    if safetensors_path.is_file():
        with safe_open(str(safetensors_path), framework="pt", device="cpu") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
            yield str(safetensors_path), shapes, handle.get_tensor
    elif ckpt_path.is_file():
        state = _torch_load(ckpt_path)
        yield str(ckpt_path), {key: tuple(t.shape) for key, t in state.items()}, state.__getitem__
    else:
        raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {CKPT_FILE} in {folder}")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: tensors are read from the page cache as they are copied to the target, never all at once.
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise ValueError(f"{path}: cannot be read as a torch checkpoint: {exc}") from exc
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        # weights_only refuses arbitrary objects: a training checkpoint or a pickled module.
        raise ValueError(f"{path}: not a plain tensor checkpoint ({exc})") from exc
    return _flat_state(path, loaded)


def _flat_state(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    """The published file is a flat OrderedDict of tensors; a {"state_dict": ...} wrapper is unwrapped."""
    if isinstance(loaded, Mapping) and not _is_flat(loaded) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors, got {type(loaded).__name__}")
    if not _is_flat(loaded):
        bad = [repr(k) for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        raise ValueError(
            f"{path}: expected a flat mapping of tensor names to tensors; "
            f"{len(bad)} entr(y/ies) are not (e.g. {', '.join(bad[:5])})"
        )
    return dict(loaded)


def _is_flat(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _converted(source: str, key: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ValueError(f"{source}: {key} has dtype {tensor.dtype}; every TripoSR tensor is floating point")
    # copy=True: the model must own its memory, not alias the memory-mapped file.
    return tensor.to(device=device, dtype=dtype, copy=True)


def _check_keys(source: str, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [(key, shapes[key], want) for key, want in expected.items() if key in shapes and shapes[key] != want]
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(source, missing, unexpected, mismatched)

"""Where a model's weights come from, resolved the way Hugging Face users expect.

`ModelSettings.id` may name a local folder, a single checkpoint file, or a hub repo id
(looked up in the HF cache, downloaded there when online). Offline mode
(`KILN_OFFLINE=1` or `HF_HUB_OFFLINE=1`) never touches the network: a model missing from
the cache is a startup error that says what to set, not a hang.
"""

from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from kiln_runtime.settings import ModelSettings

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class SourceKind(enum.Enum):
    HUB = "hub"
    FOLDER = "folder"
    SINGLE_FILE = "single_file"


class ModelUnavailable(RuntimeError):
    """The configured model cannot be found or fetched; the message says what to change."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location."""

    kind: SourceKind
    id: str  # as configured: repo id or path
    revision: str  # the hub revision asked for; "" for local sources
    path: Path | None  # local folder or file; None for hub ids (resolved by the loader)
    cache_dir: Path | None = None  # the HF cache for hub ids; None: huggingface_hub's default

    @property
    def display_id(self) -> str:
        return self.path.name if self.path is not None else self.id


def resolve(settings: ModelSettings, *, setting_prefix: str) -> ModelSource:
    """Classify `settings.id` without loading anything; local paths must exist."""
    identifier = settings.id.strip()
    if not identifier:
        raise ModelUnavailable(f"no model configured; set {setting_prefix}__MODEL__ID to a hub id, folder or file")
    path = Path(identifier).expanduser()
    if path.is_dir():
        return ModelSource(SourceKind.FOLDER, identifier, "", path.resolve())
    if path.is_file():
        return ModelSource(SourceKind.SINGLE_FILE, identifier, "", path.resolve())
    looks_local = identifier.startswith(("/", ".", "~")) or identifier.endswith(SINGLE_FILE_SUFFIXES)
    if looks_local or identifier.count("/") != 1:
        raise ModelUnavailable(
            f"{setting_prefix}__MODEL__ID={identifier!r} is neither an existing folder or file nor a hub id "
            "of the form owner/name"
        )
    return ModelSource(SourceKind.HUB, identifier, settings.revision.strip(), None, settings.cache_dir)


def public_model_id(identifier: str) -> str:
    """How a model is named to clients: a hub id as it is, a local folder or file by its name only.

    The server's folders are nobody else's business (and name users, mounts and layouts).
    """
    text = identifier.strip()
    if not text:
        return text
    path = Path(text).expanduser()
    local = text.startswith(("/", ".", "~")) or text.endswith(SINGLE_FILE_SUFFIXES) or text.count("/") != 1
    if not (local or path.exists()):
        return text  # owner/name on the hub
    return path.name if path.name not in ("", ".", "..") else path.resolve().name


def offline_requested(offline_setting: bool) -> bool:
    return offline_setting or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def offline_message(source: ModelSource, setting_prefix: str, error: BaseException) -> str:
    cache = source.cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return (
        f"model {source.id!r} (revision {source.revision or 'main'}) is not in the Hugging Face cache ({cache}) "
        f"and offline mode is on (KILN_OFFLINE / HF_HUB_OFFLINE). Download it once while online, or set "
        f"{setting_prefix}__MODEL__ID to a local diffusers folder or checkpoint file. ({type(error).__name__})"
    )


def file_sha256(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """The revision of a single-file checkpoint: its SHA-256, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()

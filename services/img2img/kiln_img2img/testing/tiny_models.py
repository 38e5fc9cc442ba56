"""Tiny Stable Diffusion 1.5-shaped models, generated offline in the three forms users bring weights in.

The img2img server loads SD1.5 from a diffusers folder, from a single original-layout (LDM / A1111)
`.safetensors` file next to a config-only folder, or from a hub id resolved in the Hugging Face cache.
Tests must exercise that real loading code, but nothing can be downloaded here, so this module builds
a randomly initialised model with SD1.5's real topology at tiny widths (about 10 MB) and writes it in
all three forms:

    <root>/diffusers/                      save_pretrained folder (safetensors), classic CLIP tokenizer files
    <root>/single-file/model.safetensors   the same weights, LDM key layout
    <root>/single-file/config/             config-only diffusers folder (JSON + tokenizer, no weights)
    <root>/hub/models--kiln-test--tiny-sd15/{refs/main, blobs/<sha256>, snapshots/<commit>/...}
    <root>/.complete                       stamp, written last

The topology matters: a 4-level VAE gives `vae_scale_factor` 8 (sizes round to multiples of 8 as for
the real model) and the standard diffusers <-> LDM key mapping only exists for 4 UNet levels. The
weights are seeded, so every generation writes identical bytes (and the same revision). The three
forms hold identical weights and configs, so they give the same image for the same seed; bit for bit
once the weights are copied out of the memory-mapped files (CPU kernels round differently for tensors
at different alignments, and each file layout puts them at different offsets). Generation happens once
per root: later calls see the stamp and return without importing torch.

CLI: `python -m kiln_img2img.testing.tiny_models [OUT_DIR] [--force]`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "REPO_ID",
    "SCHEDULER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "TOKENIZER_CONFIG",
    "TOKENIZER_MAX_LENGTH",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "VERSION",
    "TinyModels",
    "default_root",
    "ensure_tiny_models",
    "main",
]

VERSION: Final = "kiln-tiny-sd15/1"
"""Content of the stamp file; bump it whenever the generated files change, so stale roots regenerate."""

REPO_ID: Final = "kiln-test/tiny-sd15"
"""Hub id under which the model sits in the generated Hugging Face cache."""

TOKENIZER_MAX_LENGTH: Final = 77
"""CLIP's context length; the pipeline pads and truncates prompts to the tokenizer's model_max_length."""

SEED: Final = 0

ENV_ROOT: Final = "KILN_TINY_MODELS"

UNET_CONFIG: Final[Mapping[str, Any]] = {
    "sample_size": 8,  # a hint only: 64 px images / 8
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (32, 32, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,  # = the text encoder's hidden size
    "attention_head_dim": 8,  # SD1.x's legacy name for the number of heads
    "norm_num_groups": 32,
}

VAE_CONFIG: Final[Mapping[str, Any]] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),  # 4 levels: vae_scale_factor = 2 ** 3
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

TEXT_ENCODER_CONFIG: Final[Mapping[str, Any]] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": TOKENIZER_MAX_LENGTH,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
"""CLIPTextConfig values; the vocabulary size and special token ids come from the generated tokenizer."""

SCHEDULER_CONFIG: Final[Mapping[str, Any]] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
"""scheduler/scheduler_config.json of the SD1.5 hub repo, verbatim (including its stray clip_sample)."""

BOS_TOKEN: Final = "<|startoftext|>"
EOS_TOKEN: Final = "<|endoftext|>"

TOKENIZER_CONFIG: Final[Mapping[str, Any]] = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": TOKENIZER_MAX_LENGTH,
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "do_lower_case": True,
}

# Words spelled out by merges, so that common test prompts also exercise multi-byte tokens; every other
# string still encodes, byte by byte.
_MERGED_WORDS: Final = ("a", "photo", "of", "cat", "dog", "red", "chair", "blurry", "low", "quality")

_STAMP: Final = ".complete"
_HUB_DIR: Final = "hub"
_WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".ckpt", ".pt")


@dataclass(frozen=True)
class TinyModels:
    """Where one generated set of tiny models lives.

    Attributes:
        root: The folder everything was generated into.
        diffusers_dir: `save_pretrained` folder; load with `from_pretrained(diffusers_dir)`.
        single_file: Original-layout (LDM / A1111) checkpoint of the same weights.
        config_dir: Config-only diffusers folder for `from_single_file(single_file, config=config_dir)`.
        hub_cache: Hugging Face cache folder (use as `HF_HUB_CACHE` or `cache_dir`) holding `repo_id`.
        repo_id: Hub id of the model in `hub_cache`.
        revision: Commit hash that `refs/main` of `repo_id` points to.
    """

    root: Path
    diffusers_dir: Path
    single_file: Path
    config_dir: Path
    hub_cache: Path
    repo_id: str
    revision: str

    @property
    def snapshot_dir(self) -> Path:
        """The cache snapshot folder `snapshot_download(repo_id)` resolves to."""
        return _repo_cache_dir(self.hub_cache) / "snapshots" / self.revision

    @classmethod
    def at(cls, root: Path, revision: str) -> TinyModels:
        """Describe the layout under `root` (nothing is checked or generated)."""
        return cls(
            root=root,
            diffusers_dir=root / "diffusers",
            single_file=root / "single-file" / "model.safetensors",
            config_dir=root / "single-file" / "config",
            hub_cache=root / _HUB_DIR,
            repo_id=REPO_ID,
            revision=revision,
        )


def default_root() -> Path:
    """Where the tiny models are kept unless a caller says otherwise.

    Returns:
        `$KILN_TINY_MODELS` if set, else `<repo>/.kiln/tiny-models` (`.kiln/` is git-ignored).
    """
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser()
    # services/img2img/kiln_img2img/testing/tiny_models.py -> the repository root is 4 levels up.
    return Path(__file__).resolve().parents[4] / ".kiln" / "tiny-models"


def ensure_tiny_models(root: Path, *, force: bool = False) -> TinyModels:
    """Generate the tiny models into `root` unless a complete set is already there.

    A complete set (stamp present with the current `VERSION`) is returned at once, without importing
    torch. Otherwise the models are generated into a temporary folder beside `root` and renamed into
    place, so a crash never leaves a half-written `root`. Concurrent callers serialise on a lock file
    beside `root`; a caller that waited finds the set complete and reuses it.

    Args:
        root: Folder to hold the models (created with its parents as needed).
        force: Regenerate even if a complete set exists.

    Returns:
        The paths of the generated models.
    """
    root = Path(root).absolute()
    if not force and (found := _complete(root)) is not None:
        return found
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.parent / f".{root.name}.lock"):
        if not force and (found := _complete(root)) is not None:
            return found
        # Under the lock, leftovers of a crashed generation belong to no live process.
        for stale in root.parent.glob(f".{root.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        work.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache (e.g. CI's) from other users
        try:
            _generate(work)
            _move_into_place(work, root, replace=force)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    found = _complete(root)
    if found is None:
        raise RuntimeError(f"tiny models at {root} are incomplete right after generation")
    return found


def _complete(root: Path) -> TinyModels | None:
    try:
        if (root / _STAMP).read_text(encoding="utf-8").strip() != VERSION:
            return None
        revision = (_repo_cache_dir(root / _HUB_DIR) / "refs" / "main").read_text(encoding="ascii").strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    models = TinyModels.at(root, revision)
    needed = (models.diffusers_dir / "model_index.json", models.single_file, models.config_dir / "model_index.json")
    return models if all(p.is_file() for p in (*needed, models.snapshot_dir / "model_index.json")) else None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as handle:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _move_into_place(work: Path, root: Path, *, replace: bool) -> None:
    if _complete(root) is not None and not replace:
        return  # a process without the lock (e.g. on Windows) finished first; keep its identical set
    if root.exists() or root.is_symlink():
        old = root.parent / f".{root.name}.tmp-old-{os.getpid()}-{time.monotonic_ns()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(work, root)
    except OSError:
        if _complete(root) is None:
            raise


def _repo_cache_dir(hub_cache: Path) -> Path:
    return hub_cache / ("models--" + REPO_ID.replace("/", "--"))


# ---------------------------------------------------------------------------------------------------------
# Generation (imports torch, diffusers and transformers lazily, so the fast path above stays cheap)


def _generate(work: Path) -> None:
    models = TinyModels.at(work, revision="")
    tokenizer_files = work / "tokenizer-files"
    _write_tokenizer_files(tokenizer_files)
    _write_diffusers_folder(models.diffusers_dir, tokenizer_files)
    shutil.rmtree(tokenizer_files)
    _write_single_file(models.diffusers_dir, models.single_file)
    shutil.copytree(
        models.diffusers_dir, models.config_dir, ignore=shutil.ignore_patterns(*(f"*{s}" for s in _WEIGHT_SUFFIXES))
    )
    _write_hub_cache(models.diffusers_dir, models.hub_cache)
    (work / _STAMP).write_text(VERSION + "\n", encoding="utf-8")  # last: marks the set complete


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # stand for themselves
    others = [b for b in range(256) if b not in printable]  # space, controls, 0x7F-0xA0, 0xAD: moved past 255
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for word in _MERGED_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in merges:
                merges.append((current, part))
            current += part
            if current not in known:
                tokens.append(current)
                known.add(current)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def _write_tokenizer_files(folder: Path) -> None:
    """Write vocab.json, merges.txt and configs: the layout of the SD1.5 repo's tokenizer/ folder."""
    vocab, merges = _clip_vocab()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    special = {key: TOKENIZER_CONFIG[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _write_diffusers_folder(folder: Path, tokenizer_files: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_files), local_files_only=True)
    vocab, _ = _clip_vocab()
    # fork_rng: seeding must not disturb the caller's global RNG stream (tests generate mid-session).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(SEED)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(SEED)
        text_config = CLIPTextConfig(
            **TEXT_ENCODER_CONFIG,
            vocab_size=len(vocab),
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[EOS_TOKEN],
        )
        text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,  # also silences diffusers' "safety checker disabled" warning
    )
    # mypy resolves top-level diffusers names to the dummy classes of its TYPE_CHECKING branch.
    pipe.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[attr-defined]
    # transformers 5 saves only tokenizer.json; users' SD1.5 folders have the classic vocab/merges files
    # (the slow-to-fast conversion path), so ship those instead. Same for the verbatim scheduler config.
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tokenizer_files, folder / "tokenizer")
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SCHEDULER_CONFIG, indent=2) + "\n", encoding="utf-8"
    )


def _write_single_file(diffusers_dir: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from kiln_img2img.testing.ldm import diffusers_to_ldm

    state = diffusers_to_ldm(
        load_file(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"),
        load_file(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"),
        load_file(diffusers_dir / "text_encoder" / "model.safetensors"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out, metadata={"format": "pt"})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_hub_cache(source: Path, hub_cache: Path) -> None:
    """Lay `source` out as huggingface_hub's cache does: content-addressed blobs, symlinked snapshot."""
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    hashes = {rel: _sha256(source / rel) for rel in files}
    # A deterministic stand-in for the git commit: identical content gives the identical revision.
    revision = hashlib.sha1(
        "".join(f"{rel}\0{hashes[rel]}\n" for rel in files).encode(), usedforsecurity=False
    ).hexdigest()
    repo = _repo_cache_dir(hub_cache)
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    for rel in files:
        blob = repo / "blobs" / hashes[rel]
        if not blob.exists():
            shutil.copyfile(source / rel, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Relative, like the real cache, so the tree survives being renamed into place.
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlink permission (Windows): huggingface_hub then stores copies too
            shutil.copyfile(blob, link)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision, encoding="ascii")  # no newline, as huggingface_hub writes it


# ---------------------------------------------------------------------------------------------------------
# CLI


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the tiny models and print where they are.

    Args:
        argv: Command-line arguments without the program name (defaults to `sys.argv[1:]`).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m kiln_img2img.testing.tiny_models", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "out_dir", nargs="?", type=Path, default=None, help=f"target folder (default: {default_root()})"
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete set exists")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    models = ensure_tiny_models(args.out_dir or default_root(), force=args.force)
    elapsed = time.perf_counter() - started
    rows = [
        ("diffusers_dir", models.diffusers_dir),
        ("single_file", models.single_file),
        ("config_dir", models.config_dir),
        ("hub_cache", models.hub_cache),
        ("snapshot_dir", models.snapshot_dir),
    ]
    for name, path in rows:
        print(f"{name:14} {path}  ({_size(path) / 1e6:.2f} MB)")
    print(f"{'repo_id':14} {models.repo_id}")
    print(f"{'revision':14} {models.revision}")
    print(f"{'total':14} {_size(models.root) / 1e6:.2f} MB in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

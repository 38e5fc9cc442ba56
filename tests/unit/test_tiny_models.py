"""The generated tiny SD1.5 models load through diffusers' public entry points, offline, in all three forms."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# torch, diffusers and transformers are imported inside the tests: collecting the suite stays fast.
from kiln_img2img.testing.tiny_models import (
    REPO_ID,
    TOKENIZER_MAX_LENGTH,
    VERSION,
    TinyModels,
    ensure_tiny_models,
)

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 7


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the env var guards child processes, the
    # constant this one.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    # Same-seed outputs are bit-identical only at the same thread count (reduction order).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _input_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8))


def _materialise(pipe: Any) -> Any:
    """Copy every weight out of the memory-mapped file into fresh (aligned) memory.

    diffusers leaves safetensors weights mapped at their offsets in the file, and CPU kernels round
    differently for differently aligned data: the same numbers stored in the diffusers layout and in
    the LDM layout give images ~1e-5 apart. Fresh allocations make the comparison about the weights.
    """
    import torch

    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for param in module.parameters():
                param.data = param.data.clone()
    return pipe


def _img2img(pipe: Any) -> np.ndarray[Any, Any]:
    import torch

    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of a cat",
        image=_input_image(),
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=7.5,
        negative_prompt="blurry",
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    )
    image: np.ndarray[Any, Any] = out.images[0]
    assert image.shape == (64, 64, 3)
    return image


def hub_child(argv: list[str]) -> None:
    """Runs in a fresh interpreter whose HF_HUB_CACHE / HF_HUB_OFFLINE were set before any import."""
    out, revision = Path(argv[0]), argv[1]
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from huggingface_hub import snapshot_download

    torch.set_num_threads(1)
    result = {
        "snapshot_main": snapshot_download(REPO_ID, local_files_only=True),
        "snapshot_revision": snapshot_download(REPO_ID, revision=revision, local_files_only=True),
    }
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(REPO_ID, local_files_only=True)
    by_revision = StableDiffusionImg2ImgPipeline.from_pretrained(REPO_ID, revision=revision, local_files_only=True)
    result["vae_scale_factor"] = pipe.vae_scale_factor
    np.save(out / "raw.npy", _img2img(pipe))
    np.save(out / "materialised.npy", _img2img(_materialise(pipe)))
    np.save(out / "revision.npy", _img2img(_materialise(by_revision)))
    (out / "result.json").write_text(json.dumps(result))


def test_three_forms_load_offline_and_agree(tiny: TinyModels, one_thread: None, tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HUB_CACHE": str(tiny.hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    code = "import sys; from tests.unit.test_tiny_models import hub_child; hub_child(sys.argv[1:])"
    # Started first: its interpreter start-up overlaps the loads below.
    child = subprocess.Popen(
        [sys.executable, "-W", "error", "-c", code, str(tmp_path), tiny.revision],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        folder = StableDiffusionImg2ImgPipeline.from_pretrained(tiny.diffusers_dir, local_files_only=True)
        single = StableDiffusionImg2ImgPipeline.from_single_file(
            str(tiny.single_file), config=str(tiny.config_dir), local_files_only=True
        )
        for name in ("unet", "vae", "text_encoder"):
            a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
            assert a.keys() == b.keys(), name
            assert all(torch.equal(a[k], b[k]) for k in a), name
        assert folder.vae_scale_factor == single.vae_scale_factor == 8
        assert type(single.scheduler) is type(folder.scheduler)
        assert dict(single.scheduler.config) == dict(folder.scheduler.config)
        folder_raw = _img2img(folder)
        folder_image = _img2img(_materialise(folder))
        single_image = _img2img(_materialise(single))
        log, _ = child.communicate(timeout=90)
    finally:
        child.kill()
    assert child.returncode == 0, log
    result = json.loads((tmp_path / "result.json").read_text())
    snapshot = str(tiny.hub_cache.resolve() / tiny.snapshot_dir.relative_to(tiny.hub_cache))
    assert result["snapshot_main"] == result["snapshot_revision"] == snapshot
    assert result["vae_scale_factor"] == 8
    assert single_image.tobytes() == folder_image.tobytes()
    assert np.load(tmp_path / "materialised.npy").tobytes() == folder_image.tobytes()
    assert np.load(tmp_path / "revision.npy").tobytes() == folder_image.tobytes()
    # Same files, same mapping offsets: the hub form matches even without materialising.
    assert np.load(tmp_path / "raw.npy").tobytes() == folder_raw.tobytes()


def test_tokenizer(tiny: TinyModels) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny.diffusers_dir / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == TOKENIZER_MAX_LENGTH == 77
    ids = tokenizer("a photo of a cat")["input_ids"]
    vocab = tokenizer.get_vocab()
    words = ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert ids == [tokenizer.bos_token_id, *(vocab[w] for w in words), tokenizer.eos_token_id]
    long_prompt = " ".join(["word"] * 200)
    truncated = tokenizer(long_prompt, padding="max_length", truncation=True)["input_ids"]
    assert len(truncated) == 77
    assert truncated[-1] == tokenizer.eos_token_id
    # Anything encodes through the byte fallback, none of it as the unknown token.
    odd = tokenizer("Ünïcødé ✓ 🔥 \t tabs")["input_ids"]
    assert odd[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in odd[1:-1]
    assert (tiny.config_dir / "tokenizer" / "vocab.json").read_bytes() == (
        tiny.diffusers_dir / "tokenizer" / "vocab.json"
    ).read_bytes()


def test_single_file_has_ldm_layout(tiny: TinyModels) -> None:
    from safetensors import safe_open

    with safe_open(tiny.single_file, framework="pt") as f:
        keys = set(f.keys())
        q = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
        position_ids = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    for key in (
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.decoder.up.0.block.2.conv2.weight",
        "first_stage_model.quant_conv.weight",
    ):
        assert key in keys, key
    assert len(q) == 4 and q[2:] == [1, 1]
    assert position_ids.tolist() == [list(range(77))]
    assert not any(p.suffix in {".safetensors", ".bin"} for p in tiny.config_dir.rglob("*"))


def test_converter_rejects_other_topologies() -> None:
    import torch

    from kiln_img2img.testing.ldm import diffusers_to_ldm

    tensor = torch.zeros(1)
    with pytest.raises(ValueError, match=r"down_blocks\.4"):
        diffusers_to_ldm({"down_blocks.4.resnets.0.conv1.weight": tensor}, {}, {})
    with pytest.raises(ValueError, match="conv_frobnicate"):
        diffusers_to_ldm({}, {"encoder.conv_frobnicate.weight": tensor}, {})


def test_hub_cache_layout(tiny: TinyModels) -> None:
    repo = tiny.hub_cache / "models--kiln-test--tiny-sd15"
    revision = (repo / "refs" / "main").read_text()
    assert revision == tiny.revision and len(revision) == 40 and int(revision, 16) >= 0
    weights = tiny.snapshot_dir / "unet" / "diffusion_pytorch_model.safetensors"
    if weights.is_symlink():
        target = Path(os.readlink(weights))
        assert not target.is_absolute() and target.parent.name == "blobs"
    assert weights.read_bytes() == (tiny.diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_second_call_reuses_without_torch(tiny: TinyModels) -> None:
    stamp = tiny.root / ".complete"
    before = stamp.stat().st_mtime_ns
    started = time.perf_counter()
    again = ensure_tiny_models(tiny.root)
    assert time.perf_counter() - started < 1.0
    assert again == tiny
    assert stamp.stat().st_mtime_ns == before
    assert stamp.read_text().strip() == VERSION
    # A fresh interpreter proves the fast path imports no torch (tests and servers start quickly).
    code = (
        "import sys; from pathlib import Path; from kiln_img2img.testing.tiny_models import ensure_tiny_models;"
        "ensure_tiny_models(Path(sys.argv[1])); print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny.root)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert stamp.stat().st_mtime_ns == before


def test_missing_stamp_regenerates_identically(tiny: TinyModels, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(tiny.root, copy, symlinks=True)
    (copy / ".complete").unlink()
    (copy / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half-written")
    regenerated = ensure_tiny_models(copy)
    assert (copy / ".complete").read_text().strip() == VERSION
    assert regenerated.revision == tiny.revision  # seeded weights: byte-identical files, same commit
    for path in sorted(tiny.root.rglob("*")):
        twin = copy / path.relative_to(tiny.root)
        if path.is_file() and path.name != ".complete":
            assert twin.read_bytes() == path.read_bytes(), path
    assert not list(tmp_path.glob(".models.tmp-*"))  # the work folder was renamed or removed

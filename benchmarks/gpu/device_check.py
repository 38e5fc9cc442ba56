"""Kiln's device check: the full-size models on a CUDA machine, against raw diffusers and plain TripoSR.

One process, one table. On a CUDA device it writes SD1.5 and TripoSR at their published dimensions
with random weights (`random_models`; nothing is downloaded), then measures:

- img2img 512x512, 50 steps x strength 0.75 (37 UNet steps), CFG 7.5, Euler: raw diffusers eager
  (batch 1 and batch 4) and raw diffusers with channels_last, fused QKV and torch.compile
  (`reduce-overhead`, CUDA graphs) on the UNet and the VAE decoder - the baselines;
- Kiln's server path: a real gRPC server in this process with the local provider on that model, one
  request end to end (PNG in, PNG out), its output against the eager pipeline's for the same seed,
  then N concurrent same-shape requests (images/s);
- the batching benchmark (`benchmarks/img2img_batching.py`) when it offers `run_device`;
- TripoSR image -> GLB at resolution 256 (no background removal, vertex colours) through the mesh
  server, against the plain method in the same process: every grid point through the whole decoder
  in chunks of 8192, then the same marching cubes and export;
- the CUDA tests: every test file that skips with "needs a CUDA device", plus
  tests/unit/test_mc_torch.py, run by pytest; on CUDA a skip for want of CUDA counts as a failure.

The servers take their settings from the environment like in production, with defaults set here for
what the check needs (model folder, port 0, queue depth). So the serving options under test can be
given on the command line, e.g. `KILN_IMG2IMG__RUNTIME__CUDA_DTYPE=bfloat16 python ...`.

    python benchmarks/gpu/device_check.py             # CUDA: full sizes (about 5-8 minutes)
    python benchmarks/gpu/device_check.py --dry-run   # CPU: tiny sizes, few steps (under a minute)

The dry run runs every section on the tiny models (compilation with the `eager` backend, so that
TorchDynamo traces the same graphs without needing a C++ compiler) and collects the CUDA tests
without running them; tests/test_device_check.py runs it as part of `make test`. Exit status 1 when a
check fails (parity out of tolerance, a CUDA test failing or skipped on CUDA); the table prints anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc
import numpy as np
import random_models
import torch
from cuda_only import CUDA_SKIP_REASON
from PIL import Image, ImageDraw

from kiln.common.v1 import artifact_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img_pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh_pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parents[1]
PROMPT, NEGATIVE, SEED = "a lighthouse at dusk, oil painting", "blurry", 1234
BASELINE_CHUNK: Final = 8192  # the reference TripoSR code's default chunk for the grid query
MESH_THRESHOLD: Final = 25.0  # TripoSR's iso-level; the planted ellipsoid is built around it


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one run: the device run or the CPU dry run."""

    device: str
    dtype: torch.dtype
    full: bool
    side: int
    steps: int
    strength: float
    guidance: float
    batch: int  # batch of the raw-pipeline throughput rows
    clients: int  # concurrent requests of the server throughput row
    runs: int  # timed repetitions of each latency row (median reported)
    compile_backend: str
    compile_mode: str | None
    compile_unet: bool  # the UNet too, not only the VAE decoder (tracing the UNet costs the CPU dry run ~20 s)
    compile_batch: bool  # also compile (and time) the batch-`batch` shape; tracing is the dry run's largest cost
    mesh_resolution: int
    mesh_runs: int
    # Parity of the server's PNG against the eager pipeline's image, mean |difference| in 0..255 units.
    # CPU float32 runs the same kernels in the same order: identical. On CUDA fp16 the serving
    # options under test (compiled graphs, batching) reorder float work; over 37 steps of a
    # random-weight UNet that stays within a few levels on average.
    image_tolerance: float
    # Relative difference of the vertex count, Kiln's mesh against the per-point baseline's: the two
    # grid fills agree to about 1e-5 relative, which can flip a few voxels at the iso-level.
    mesh_tolerance: float
    # The mesh server's inline limit; the dry run's small meshes would otherwise never take the chunked path.
    mesh_inline_bytes: int | None


DEVICE_PLAN: Final = Plan(
    device="cuda",
    dtype=torch.float16,
    full=True,
    side=512,
    steps=50,
    strength=0.75,
    guidance=7.5,
    batch=4,
    clients=16,
    runs=3,
    compile_backend="inductor",
    compile_mode="reduce-overhead",
    compile_unet=True,
    compile_batch=True,
    mesh_resolution=256,
    mesh_runs=3,
    image_tolerance=4.0,
    mesh_tolerance=0.01,
    mesh_inline_bytes=None,
)
DRY_PLAN: Final = Plan(
    device="cpu",
    dtype=torch.float32,
    full=False,
    side=64,
    steps=4,
    strength=0.75,
    guidance=7.5,
    batch=2,
    clients=3,
    runs=2,
    compile_backend="eager",
    compile_mode=None,
    compile_unet=False,
    compile_batch=False,
    mesh_resolution=48,
    mesh_runs=2,
    image_tolerance=0.0,
    mesh_tolerance=0.01,
    mesh_inline_bytes=16 * 1024,
)


@dataclass
class Row:
    """One line of the table."""

    section: str
    what: str
    seconds: float | None = None  # absolute time (per image or per request), or None
    value: str = ""  # ratio, throughput or count
    check: str = ""  # "ok", "FAIL: ..." or "" when nothing is checked


@dataclass
class Report:
    """Everything the check measured, printed as one table at the end."""

    header: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, section: str, what: str, seconds: float | None = None, value: str = "") -> None:
        self._append(Row(section, what, seconds, value))

    def check(self, section: str, what: str, ok: bool, value: str) -> None:
        self._append(Row(section, what, None, value, "ok" if ok else "FAIL"))
        if not ok:
            self.failed.append(f"{section}: {what} ({value})")

    def _append(self, row: Row) -> None:
        # Progress on stderr as it happens: a run cut short by a timeout still shows how far it got.
        seconds = "" if row.seconds is None else f" {row.seconds:.3f} s"
        print(f"[device_check] {row.section}: {row.what}{seconds} {row.value} {row.check}", file=sys.stderr, flush=True)
        self.rows.append(row)

    def table(self) -> str:
        lines = [f"{key:12} {value}" for key, value in self.header.items()]
        lines.append("")
        lines.append(f"{'section':10} {'measurement':58} {'time':>11}  {'ratio / value':28} check")
        lines.append("-" * 118)
        for row in self.rows:
            seconds = "" if row.seconds is None else f"{row.seconds * 1000:9.1f}ms"
            lines.append(f"{row.section:10} {row.what:58} {seconds:>11}  {row.value:28} {row.check}")
        lines.append("-" * 118)
        lines.append("result: " + ("all checks passed" if not self.failed else "FAILED: " + "; ".join(self.failed)))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(plan: Plan, call: Callable[[], object]) -> float:
    sync(plan.device)
    started = time.perf_counter()
    call()
    sync(plan.device)
    return time.perf_counter() - started


def median_of(plan: Plan, runs: int, call: Callable[[], object]) -> float:
    return statistics.median(timed(plan, call) for _ in range(runs))


async def amedian_of(runs: int, call: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def free(device: str) -> None:
    # Compiled graphs hold their CUDA graph memory pools, and TorchDynamo's per-function cache limit
    # (8 entries) counts every model instance compiled through the same forward code: a later
    # section's server must start from empty caches, or it silently falls back to eager.
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Defaults for the servers' settings; a variable the caller already set wins."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def input_png(side: int) -> bytes:
    """A structured picture (gradient and shapes), so img2img has something to keep."""
    image = Image.radial_gradient("L").resize((side, side)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((side // 8, side // 2, side // 2, side - side // 8), fill=(200, 60, 40))
    draw.ellipse((side // 2, side // 8, side - side // 8, side // 2), fill=(40, 90, 210))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def object_png(side: int = 512) -> bytes:
    """An object on a plain background, already framed: the mesh request skips background removal."""
    image = Image.new("RGB", (side, side), (127, 127, 127))
    draw = ImageDraw.Draw(image)
    draw.ellipse((side // 4, side // 6, 3 * side // 4, 5 * side // 6), fill=(220, 130, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def artifact_bytes(stream: Any) -> bytes:
    """The first artifact of a Generate stream, inline or reassembled from its chunks, as a client gets it."""
    chunks: list[bytes] = []
    async for event in stream:
        kind = event.WhichOneof("event")
        if kind == "chunk":
            chunks.append(event.chunk.data)
        elif kind == "result":
            inline: bytes = event.result.artifacts[0].inline_data
            return inline or b"".join(chunks)
    return b""


# ---------------------------------------------------------------------------------------------------------
# img2img: raw diffusers baselines


def load_pipeline(plan: Plan, folder: Path) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    pipe: Any = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(folder),
        torch_dtype=plan.dtype,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(plan.device)


def pipeline_call(plan: Plan, pipe: Any, image: Image.Image, batch: int) -> list[Image.Image]:
    # Per-sample CPU generators: the server's noise for the same seed, batched or not.
    generators = [torch.Generator("cpu").manual_seed(SEED + index) for index in range(batch)]
    with torch.inference_mode():
        images: list[Image.Image] = pipe(
            prompt=[PROMPT] * batch,
            negative_prompt=[NEGATIVE] * batch,
            image=[image] * batch,
            strength=plan.strength,
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance,
            generator=generators,
        ).images
    return images


def compile_pipeline(plan: Plan, pipe: Any) -> None:
    """What a skilled user does for speed: channels_last, fused QKV, torch.compile of UNet and decoder."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    # dynamic=False: one static graph per batch shape, as a user compiling for fixed shapes gets.
    options: dict[str, Any] = {"backend": plan.compile_backend, "dynamic": False}
    if plan.compile_mode is not None:
        options["mode"] = plan.compile_mode
    if plan.compile_unet:
        pipe.unet = torch.compile(pipe.unet, **options)
    pipe.vae.decode = torch.compile(pipe.vae.decode, **options)


def sd_baselines(plan: Plan, folder: Path, report: Report) -> np.ndarray:
    """Raw diffusers, eager then compiled; returns the eager batch-1 image for the parity check."""
    from kiln_img2img.preprocess import prepare_image

    image = prepare_image(Image.open(io.BytesIO(input_png(plan.side)))).image
    section = "img2img"
    started = time.perf_counter()
    pipe = load_pipeline(plan, folder)
    report.add(section, "raw diffusers: load the pipeline", time.perf_counter() - started)
    first = timed(plan, lambda: pipeline_call(plan, pipe, image, 1))
    report.add(section, "raw eager: first call (batch 1)", first)
    reference = np.asarray(pipeline_call(plan, pipe, image, 1)[0], dtype=np.float32)
    eager = median_of(plan, plan.runs, lambda: pipeline_call(plan, pipe, image, 1))
    report.add(section, "raw eager: per image, batch 1", eager, "1.00x (baseline)")
    pipeline_call(plan, pipe, image, plan.batch)
    eager_batch = median_of(plan, max(2, plan.runs // 2), lambda: pipeline_call(plan, pipe, image, plan.batch))
    report.add(section, f"raw eager: batch {plan.batch}", eager_batch, f"{plan.batch / eager_batch:.2f} images/s")

    compile_pipeline(plan, pipe)
    label = f"{plan.compile_backend}" + (f"/{plan.compile_mode}" if plan.compile_mode else "")
    # Compilation (and CUDA graph capture on the next calls) happens on the first calls per shape.
    warm = timed(plan, lambda: pipeline_call(plan, pipe, image, 1))
    warm += timed(plan, lambda: pipeline_call(plan, pipe, image, 1))
    report.add(section, f"raw compiled ({label}): warm-up, batch 1", warm)
    compiled = median_of(plan, plan.runs, lambda: pipeline_call(plan, pipe, image, 1))
    report.add(section, "raw compiled: per image, batch 1", compiled, f"speed-up {eager / compiled:.2f}x over eager")
    if plan.compile_batch:
        warm = timed(plan, lambda: pipeline_call(plan, pipe, image, plan.batch))
        warm += timed(plan, lambda: pipeline_call(plan, pipe, image, plan.batch))
        report.add(section, f"raw compiled: warm-up, batch {plan.batch}", warm)
        compiled_batch = median_of(plan, max(2, plan.runs // 2), lambda: pipeline_call(plan, pipe, image, plan.batch))
        report.add(
            section, f"raw compiled: batch {plan.batch}", compiled_batch, f"{plan.batch / compiled_batch:.2f} images/s"
        )
    report.header["baselines"] = f"eager {eager:.3f} s/image, compiled {compiled:.3f} s/image (batch 1)"
    return reference  # the pipeline goes with this frame; the caller frees the device memory


# ---------------------------------------------------------------------------------------------------------
# img2img: Kiln's server


async def img2img_server(
    plan: Plan, folder: Path, data_dir: Path, reference: np.ndarray | None, report: Report
) -> None:
    from kiln_img2img.config import Img2ImgSettings
    from kiln_img2img.server import create_server

    section = "img2img"
    settings_env = {
        "KILN_OFFLINE": "true",
        "KILN_STORAGE__DATA_DIR": str(data_dir),
        "KILN_IMG2IMG__PROVIDER": "local",
        "KILN_IMG2IMG__MODEL__ID": str(folder),
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_ENABLED": "false",
        "KILN_IMG2IMG__RUNTIME__DEVICE": plan.device,
        "KILN_IMG2IMG__RUNTIME__MAX_QUEUE": str(4 * plan.clients),
    }
    with environment(settings_env):
        settings = Img2ImgSettings(_env_file=None)
    started = time.perf_counter()
    server = create_server(settings)
    port = await server.start()
    await server.runtime.manager.wait_loaded()
    report.add(section, "Kiln server: load + warm-up until SERVING", time.perf_counter() - started)
    request = img_pb.GenerateRequest(
        image=input_png(plan.side),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=SEED,
        strength=plan.strength,
        num_inference_steps=plan.steps,
        guidance_scale=plan.guidance,
        scheduler=img_pb.SCHEDULER_EULER,
        output_format=img_pb.IMAGE_FORMAT_PNG,
        delivery=artifact_pb2.ARTIFACT_DELIVERY_INLINE,
    )
    try:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = img_grpc.Img2ImgProviderStub(channel)

            async def generate() -> bytes:
                return await artifact_bytes(stub.Generate(request))

            first_started = time.perf_counter()
            png = await generate()
            report.add(section, "Kiln gRPC: first request", time.perf_counter() - first_started)
            per_request = await amedian_of(plan.runs, generate)
            eager = _baseline_seconds(report, "raw eager: per image, batch 1")
            compiled = _baseline_seconds(report, "raw compiled: per image, batch 1")
            report.add(
                section,
                "Kiln gRPC: one request end to end (PNG in, PNG out)",
                per_request,
                f"speed-up {eager / per_request:.2f}x eager, {compiled / per_request:.2f}x compiled",
            )
            served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
            if reference is None:
                pass  # the baselines failed (their row says why): nothing to compare with
            elif served.shape != reference.shape:
                report.check(section, "Kiln output vs raw eager (same seed)", False, f"shape {served.shape}")
            else:
                difference = np.abs(served - reference)
                mean = float(difference.mean())
                report.check(
                    section,
                    f"Kiln output vs raw eager, mean |d| <= {plan.image_tolerance}",
                    mean <= plan.image_tolerance,
                    # The reference's spread shows a real picture (an fp16 overflow would make it black).
                    f"mean {mean:.3f}, max {difference.max():.0f} (0..255), ref. std {reference.std():.1f}",
                )
            started = time.perf_counter()
            outputs = await asyncio.gather(*(generate() for _ in range(plan.clients)))
            elapsed = time.perf_counter() - started
            report.check(
                section,
                f"Kiln gRPC: {plan.clients} concurrent same-shape requests",
                all(outputs),
                f"{plan.clients / elapsed:.2f} images/s",
            )
    finally:
        await server.stop(grace=0)
        del server
        free(plan.device)


def _baseline_seconds(report: Report, what: str) -> float:
    """A baseline row's time; NaN when that row is missing (its section failed), so ratios print as nan."""
    seconds = next((row.seconds for row in report.rows if row.what == what), None)
    return math.nan if seconds is None else seconds


def batching_benchmark(plan: Plan, folder: Path, report: Report) -> None:
    """Run benchmarks/img2img_batching.py's device entry point in this process, when it has one."""
    path = REPO / "benchmarks" / "img2img_batching.py"
    spec = importlib.util.spec_from_file_location("img2img_batching", path) if path.exists() else None
    if spec is None or spec.loader is None:
        report.add("batching", "benchmarks/img2img_batching.py", None, "absent: not run")
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    run_device = getattr(module, "run_device", None)
    if run_device is None:
        report.add("batching", "benchmarks/img2img_batching.py", None, "has no run_device(): not run")
        return
    # Contract: run_device(model_folder, device, dtype, side, steps, strength, guidance) returns rows
    # of (measurement, seconds or None, value) for the table.
    for what, seconds, value in run_device(
        folder, plan.device, plan.dtype, plan.side, plan.steps, plan.strength, plan.guidance
    ):
        report.add("batching", str(what), seconds, str(value))
    free(plan.device)


# ---------------------------------------------------------------------------------------------------------
# TripoSR


def mesh_baseline(plan: Plan, folder: Path, report: Report) -> Any:
    """The plain method: encode, every grid point through the whole decoder, marching cubes, export."""
    from kiln_mesh.export import MeshFormat, export_mesh
    from kiln_mesh.extract import extract_mesh
    from kiln_mesh.mesh import to_y_up
    from kiln_mesh.preprocess import prepare_mesh_input
    from kiln_mesh.triposr import load_triposr

    model = load_triposr(folder, device=plan.device, dtype=plan.dtype)
    resolution = plan.mesh_resolution

    def run() -> Any:
        image, _ = prepare_mesh_input(Image.open(io.BytesIO(object_png())), mode="NEVER", ratio=0.85, remove=None)
        with torch.inference_mode():
            code = model.encode(model.preprocess([image]).to(plan.device))[0]
            mesh = extract_mesh(
                lambda points: model.query(code, points)[0],
                lambda points: model.query(code, points)[1],
                resolution=resolution,
                threshold=MESH_THRESHOLD,
                radius=model.radius,
                chunk_size=BASELINE_CHUNK,
                device=plan.device,
            )
        export_mesh(to_y_up(mesh), MeshFormat.GLB)
        return mesh

    mesh = run()  # warm-up
    seconds = median_of(plan, plan.mesh_runs, run)
    report.add(
        "mesh",
        f"plain per-point query (chunk {BASELINE_CHUNK}), image -> GLB {resolution}^3",
        seconds,
        "1.00x (baseline)",
    )
    return mesh


async def mesh_server(plan: Plan, folder: Path, scratch: Path, baseline: Any, report: Report) -> None:
    import trimesh

    from kiln_mesh.config import MeshSettings
    from kiln_mesh.server import create_server
    from kiln_mesh.testing.u2net import write_tiny_u2net

    # rembg loads with the provider even though these requests skip it: the tiny u2net keeps it offline.
    u2net = write_tiny_u2net(scratch / "u2net.onnx")
    settings_env = {
        "KILN_OFFLINE": "true",
        "KILN_STORAGE__DATA_DIR": str(scratch / "mesh-data"),
        "KILN_MESH__PROVIDER": "local",
        "KILN_MESH__MODEL__ID": str(folder),
        "KILN_MESH__TRIPOSR__REMBG_MODEL_PATH": str(u2net),
        "KILN_MESH__SERVER__PORT": "0",
        "KILN_MESH__SERVER__METRICS_ENABLED": "false",
        "KILN_MESH__RUNTIME__DEVICE": plan.device,
    }
    if plan.mesh_inline_bytes is not None:
        settings_env["KILN_STORAGE__MAX_INLINE_BYTES"] = str(plan.mesh_inline_bytes)
    with environment(settings_env):
        settings = MeshSettings(_env_file=None)
    started = time.perf_counter()
    server = create_server(settings)
    port = await server.start()
    await server.runtime.manager.wait_loaded()
    report.add("mesh", "Kiln server: load + warm-up until SERVING", time.perf_counter() - started)
    request = mesh_pb.GenerateRequest(
        image=object_png(),
        remove_background=mesh_pb.REMOVE_BACKGROUND_NEVER,
        mc_resolution=plan.mesh_resolution,
        mc_threshold=MESH_THRESHOLD,
        output_format=mesh_pb.MESH_FORMAT_GLB,
        delivery=artifact_pb2.ARTIFACT_DELIVERY_INLINE,  # a 256^3 mesh (~5 MB) comes back as chunks
    )
    try:
        options = [("grpc.max_receive_message_length", 256 << 20)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = mesh_grpc.MeshProviderStub(channel)

            async def generate() -> bytes:
                return await artifact_bytes(stub.Generate(request))

            glb = await generate()  # warm-up: the first request at this resolution
            seconds = await amedian_of(plan.mesh_runs, generate)
            base = _baseline_seconds(
                report, f"plain per-point query (chunk {BASELINE_CHUNK}), image -> GLB {plan.mesh_resolution}^3"
            )
            report.add(
                "mesh",
                f"Kiln gRPC: image -> GLB {plan.mesh_resolution}^3, no background removal",
                seconds,
                f"speed-up {base / seconds:.2f}x over plain",
            )
    finally:
        await server.stop(grace=0)
        del server
        free(plan.device)
    if not glb:
        report.check("mesh", "Kiln GLB in the stream", False, "no bytes inline or in chunks")
        return
    if baseline is None:
        return  # the baseline failed (its row says why)
    served: Any = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh", process=False)
    relative = abs(len(served.vertices) - baseline.vertex_count) / max(1, baseline.vertex_count)
    report.check(
        "mesh",
        f"Kiln mesh vs plain: vertex count within {plan.mesh_tolerance:.0%}",
        relative <= plan.mesh_tolerance,
        f"{len(served.vertices)} vs {baseline.vertex_count} vertices",
    )


# ---------------------------------------------------------------------------------------------------------
# CUDA tests


def cuda_test_files() -> list[Path]:
    found = {REPO / "tests" / "unit" / "test_mc_torch.py"}
    for path in (REPO / "tests").rglob("test_*.py"):
        if CUDA_SKIP_REASON in path.read_text(encoding="utf-8") and path.name != "test_device_check.py":
            found.add(path)
    return sorted(found)


def cuda_tests(plan: Plan, scratch: Path, report: Report) -> None:
    """Run the CUDA tests under pytest (collect only in the dry run); skips for want of CUDA fail on CUDA."""
    files = [str(path.relative_to(REPO)) for path in cuda_test_files()]
    junit = scratch / "cuda-tests.xml"
    # cuda_only (beside this script) deselects the files' CPU tests: the main suite runs those.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "cuda_only"]
    command += [f"--junitxml={junit}", *files]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(HERE), os.environ.get("PYTHONPATH"))))}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not junit.exists():
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        report.check("tests", f"pytest {len(files)} files", False, f"exit {done.returncode}")
        return
    cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    skipped = [case for case in cases if case.find("skipped") is not None]
    cuda_skips = [case for case in skipped if CUDA_SKIP_REASON in (case.find("skipped").get("message") or "")]  # type: ignore[union-attr]
    counts = f"{len(cases) - len(skipped)} passed, {len(skipped)} skipped ({len(cuda_skips)} for want of CUDA)"
    if plan.full:
        report.check("tests", f"pytest: the CUDA tests of {len(files)} files", bool(cases) and not cuda_skips, counts)
    else:
        ok = bool(cases) and len(cuda_skips) == len(cases)  # found, and every one skipped for want of CUDA
        report.check("tests", f"pytest: the CUDA tests of {len(files)} files (CPU: all skip)", ok, counts)
    report.rows[-1].seconds = seconds


# ---------------------------------------------------------------------------------------------------------
# Main


def describe(plan: Plan) -> dict[str, str]:
    import diffusers

    if plan.device == "cuda":
        name = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        gpu = f"{name} (compute capability {capability}, {memory:.0f} GiB)"
    else:
        gpu = f"none: CPU dry run on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    cudnn = str(torch.backends.cudnn.version()) if plan.device == "cuda" else "-"  # type: ignore[no-untyped-call]
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": cudnn,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "workload": f"img2img {plan.side}^2, {plan.steps} steps x strength {plan.strength} "
        f"({int(plan.steps * plan.strength)} UNet steps), CFG {plan.guidance}, Euler, {plan.dtype}; "
        f"TripoSR -> GLB at {plan.mesh_resolution}^3",
        "models": "full-size architectures, random weights" if plan.full else "tiny models, random weights",
    }


SECTIONS: Final = ("img2img", "batching", "mesh", "tests")

T = TypeVar("T")


def guarded(report: Report, section: str, what: str, call: Callable[[], T]) -> T | None:
    """Run one part; an exception becomes a failed row (traceback on stderr) and the check goes on.

    A first run on a new machine should show every part it can, not stop at the first that breaks.
    """
    try:
        return call()
    except Exception as err:
        traceback.print_exc()
        report.check(section, f"{what} raised", False, f"{type(err).__name__}: {err}"[:300])
        return None


async def aguarded(report: Report, section: str, what: str, call: Callable[[], Awaitable[None]]) -> None:
    """`guarded` for a coroutine."""
    try:
        await call()
    except Exception as err:
        traceback.print_exc()
        report.check(section, f"{what} raised", False, f"{type(err).__name__}: {err}"[:300])


async def run_check(plan: Plan, scratch: Path, skip: set[str]) -> Report:
    report = Report(header=describe(plan))
    began = time.perf_counter()
    if plan.device == "cpu":
        torch.set_num_threads(2)  # the parity check compares bytes: pin the kernels' split
    if "img2img" not in skip or "batching" not in skip:
        started = time.perf_counter()
        sd_folder = random_models.write_sd15(scratch / "sd15", full=plan.full, device=plan.device, dtype=plan.dtype)
        report.add("setup", "write SD1.5 (random weights, diffusers folder)", time.perf_counter() - started)
    if "img2img" not in skip:
        reference = guarded(report, "img2img", "raw diffusers baselines", lambda: sd_baselines(plan, sd_folder, report))
        free(plan.device)
        await aguarded(
            report,
            "img2img",
            "Kiln server",
            lambda: img2img_server(plan, sd_folder, scratch / "img2img-data", reference, report),
        )
    if "batching" not in skip:
        guarded(report, "batching", "batching benchmark", lambda: batching_benchmark(plan, sd_folder, report))
    if "mesh" not in skip:
        started = time.perf_counter()
        mesh_folder = random_models.write_triposr(scratch / "triposr", full=plan.full)
        report.add("setup", "write TripoSR (planted ellipsoid weights)", time.perf_counter() - started)
        baseline = guarded(report, "mesh", "plain baseline", lambda: mesh_baseline(plan, mesh_folder, report))
        free(plan.device)
        await aguarded(report, "mesh", "Kiln server", lambda: mesh_server(plan, mesh_folder, scratch, baseline, report))
    if "tests" not in skip:
        guarded(report, "tests", "CUDA tests", lambda: cuda_tests(plan, scratch, report))
    total = time.perf_counter() - began
    report.header["wall time"] = f"{total:.1f} s after imports (budget {'8 min' if plan.full else '60 s'})"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, few steps (the make test run)")
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="leave a section out")
    parser.add_argument("--json", type=Path, help="also write the table's rows and header as JSON here")
    parser.add_argument("--scratch", type=Path, help="folder for the generated models (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: no CUDA device here; use --dry-run for the CPU run", file=sys.stderr)
        return 2
    plan = DRY_PLAN if args.dry_run else DEVICE_PLAN
    with tempfile.TemporaryDirectory(prefix="kiln-device-check-") as temporary:
        scratch = args.scratch or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run_check(plan, scratch, set(args.skip)))
    print(report.table())
    if args.json:
        args.json.write_text(
            json.dumps(
                {"header": report.header, "rows": [asdict(r) for r in report.rows], "failed": report.failed}, indent=2
            ),
            encoding="utf-8",
        )
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Jobs apart from their streams: how fast a client reattaches, and what a retained job costs.

Starts an img2img server (fake provider) in this process on a free loopback port, fills it with
`--jobs` finished jobs (default 1000, each 50 denoising steps with a preview every 10, the
result by reference, as the page asks), then measures, alternating in rounds so that machine
noise hits both alike:

- reattach: a new `WatchJob(job_id, after_sequence)` on a finished job (the cursor one event
  before its end), from the call to the first replayed event;
- baseline: a unary `GetJob` of the same job on the same connection (one round trip).

It prints the medians and the ratio reattach / GetJob (1.0 = reattaching costs one round trip).
Then the memory the job table holds per retained finished job (tracemalloc, running from before
the first job: what forgetting all of them frees), with the full event log and after compaction
(previews reduced to the latest one, chunks dropped), and the ratio of the two.

    python benchmarks/jobs.py [--jobs 1000] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc
from PIL import Image

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.config import Img2ImgProviderSettings, Img2ImgSettings
from kiln_img2img.server import create_server
from kiln_runtime.job_table import compact
from kiln_runtime.settings import FakeProviderSettings, JobsSettings, ServerSettings, StorageSettings

STEPS = 50


def settings(data_dir: Path, jobs: int) -> Img2ImgSettings:
    section = Img2ImgProviderSettings(
        provider="fake",
        server=ServerSettings(port=0, metrics_enabled=False),
        fake=FakeProviderSettings(steps=STEPS, step_delay_s=0.0, output_bytes=64 * 1024),
        jobs=JobsSettings(max_retained_jobs=jobs + 10, disconnect_grace_s=3600),
    )
    storage = StorageSettings(data_dir=data_dir)
    return Img2ImgSettings(_env_file=None, offline=True, storage=storage, img2img=section)


def request(seed: int) -> pb.GenerateRequest:

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buffer, format="PNG")
    return pb.GenerateRequest(
        image=buffer.getvalue(),
        prompt="a fox",
        seed=seed,
        scheduler=pb.SCHEDULER_EULER,
        output_format=pb.IMAGE_FORMAT_PNG,
        preview_every_n_steps=10,
    )


async def first_event_s(stub: pb_grpc.Img2ImgProviderStub, job_id: str, after: int) -> float:
    started = time.perf_counter()
    call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=after))
    await call.read()
    elapsed = time.perf_counter() - started
    call.cancel()
    return elapsed


async def get_job_s(stub: pb_grpc.Img2ImgProviderStub, job_id: str) -> float:
    started = time.perf_counter()
    await stub.GetJob(pb.GetJobRequest(job_id=job_id))
    return time.perf_counter() - started


async def main(jobs: int, rounds: int) -> None:
    tracemalloc.start()  # before the jobs, so that their allocations are traced
    with tempfile.TemporaryDirectory() as folder:
        server = create_server(settings(Path(folder), jobs))
        port = await server.start()
        await server.runtime.manager.wait_loaded()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.Img2ImgProviderStub(channel)
            print(f"running {jobs} jobs of {STEPS} steps ...", flush=True)
            ids = []
            for seed in range(jobs):
                events = [event async for event in stub.Generate(request(seed))]
                ids.append(events[0].accepted.job_id)
            last = events[-1].sequence
            table = server.runtime.jobs
            finished_s, baseline_s = [], []
            for index in range(rounds):
                job_id = ids[index % len(ids)]
                finished_s.append(await first_event_s(stub, job_id, last - 1))
                baseline_s.append(await get_job_s(stub, job_id))
            reattach = statistics.median(finished_s)
            baseline = statistics.median(baseline_s)
            print(f"reattach to a finished job (WatchJob to first replayed event): {reattach * 1e3:.2f} ms")
            print(f"GetJob round trip (baseline):                               {baseline * 1e3:.2f} ms")
            print(f"ratio reattach / GetJob:                                    {reattach / baseline:.2f}")

            held = [job for job in (table.get(job_id) for job_id in ids) if job is not None]
            full = _traced()
            for job in held:
                compact(job)
            compacted = _traced()
            for job in held:
                table._forget(job)
            del held
            empty = _traced()
            full_kib, compacted_kib = (full - empty) / jobs / 1024, (compacted - empty) / jobs / 1024
            print(f"retained finished jobs: {jobs}")
            print(f"memory per job, full event log:  {full_kib:.1f} KiB")
            print(f"memory per job, compacted:       {compacted_kib:.1f} KiB")
            print(f"ratio compacted / full:          {compacted_kib / full_kib:.2f}")
        await server.stop(grace=0)


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="finished jobs to retain")
    parser.add_argument("--rounds", type=int, default=200, help="reattach measurements")
    options = parser.parse_args()
    asyncio.run(main(options.jobs, options.rounds))

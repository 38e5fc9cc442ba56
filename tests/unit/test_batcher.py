"""The batcher on its own: grouping by key and size, the delay, per-member outcomes (threads, no model)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from kiln_img2img.batcher import Batcher, img2img_batch_key
from kiln_img2img.providers.base import Img2ImgInput
from kiln_runtime.provider import RunContext

LONG_DELAY_S = 30.0  # a batch that waited this long would time the test out: full batches must not wait


class Recorder:
    """A batch function that doubles its inputs and remembers every batch it ran."""

    def __init__(self, fail_item: int | None = None, raise_all: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail_item = fail_item
        self.raise_all = raise_all
        self._lock = threading.Lock()

    def __call__(self, items: Sequence[int], ctxs: Sequence[RunContext]) -> list[int | BaseException]:
        with self._lock:
            self.batches.append(list(items))
        if self.raise_all:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"item {i} failed") if i == self.fail_item else i * 2 for i in items]


def submit_all(
    batcher: Batcher[int, int], items: Sequence[int], run: Callable[..., list[int | BaseException]]
) -> list[int | BaseException]:
    """Submit every item from its own thread at once; each thread's result or exception."""
    start = threading.Barrier(len(items))

    def one(item: int) -> int | BaseException:
        start.wait()
        try:
            return batcher.submit(item, RunContext(f"job-{item}", report=lambda update: None), run)
        except Exception as err:
            return err

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(one, items))


def test_full_batch_runs_at_once_without_waiting_for_the_delay() -> None:
    sizes: list[int] = []
    batcher: Batcher[int, int] = Batcher(
        key=lambda item: "same", max_batch_size=4, max_batch_delay_s=LONG_DELAY_S, on_batch=sizes.append
    )
    run = Recorder()
    started = time.perf_counter()
    assert submit_all(batcher, [1, 2, 3, 4], run) == [2, 4, 6, 8]
    assert time.perf_counter() - started < LONG_DELAY_S / 2
    assert sizes == [4] and sorted(run.batches[0]) == [1, 2, 3, 4]


def test_lone_job_runs_after_the_delay() -> None:
    sizes: list[int] = []
    batcher: Batcher[int, int] = Batcher(
        key=lambda item: "same", max_batch_size=4, max_batch_delay_s=0.05, on_batch=sizes.append
    )
    assert submit_all(batcher, [5], Recorder()) == [10]
    assert sizes == [1]


def test_lone_admitted_job_does_not_wait_for_batch_mates() -> None:
    # `alone`: the service's admission count says no other job could join.
    batcher: Batcher[int, int] = Batcher(
        key=lambda item: "same", max_batch_size=4, max_batch_delay_s=LONG_DELAY_S, alone=lambda: True
    )
    started = time.perf_counter()
    assert submit_all(batcher, [5], Recorder()) == [10]
    assert time.perf_counter() - started < LONG_DELAY_S / 2


def test_batch_size_one_never_waits() -> None:
    batcher: Batcher[int, int] = Batcher(key=lambda item: "same", max_batch_size=1, max_batch_delay_s=LONG_DELAY_S)
    run = Recorder()
    assert submit_all(batcher, [1, 2, 3], run) == [2, 4, 6]
    assert sorted(len(batch) for batch in run.batches) == [1, 1, 1]


def test_different_keys_never_share_a_batch() -> None:
    batcher: Batcher[int, int] = Batcher(key=lambda item: item % 2, max_batch_size=2, max_batch_delay_s=LONG_DELAY_S)
    run = Recorder()
    assert submit_all(batcher, [1, 2, 3, 4], run) == [2, 4, 6, 8]
    assert sorted(sorted(batch) for batch in run.batches) == [[1, 3], [2, 4]]


def test_different_batch_functions_never_share_a_batch() -> None:
    # Two providers (a reload between the jobs) are two batch functions.
    batcher: Batcher[int, int] = Batcher(key=lambda item: "same", max_batch_size=2, max_batch_delay_s=LONG_DELAY_S)
    first, second = Recorder(), Recorder()
    start = threading.Barrier(4)

    def one(item: int) -> int:
        start.wait()
        return batcher.submit(item, RunContext("job", report=lambda update: None), first if item < 3 else second)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, [1, 2, 3, 4])) == [2, 4, 6, 8]
    assert sorted(first.batches[0]) == [1, 2] and sorted(second.batches[0]) == [3, 4]


def test_more_jobs_than_the_batch_size_split_into_batches() -> None:
    sizes: list[int] = []
    batcher: Batcher[int, int] = Batcher(
        key=lambda item: "same", max_batch_size=2, max_batch_delay_s=1.0, on_batch=sizes.append
    )
    assert submit_all(batcher, [1, 2, 3, 4, 5], Recorder()) == [2, 4, 6, 8, 10]
    assert sorted(sizes) == [1, 2, 2]


def test_one_members_error_reaches_that_member_only() -> None:
    batcher: Batcher[int, int] = Batcher(key=lambda item: "same", max_batch_size=3, max_batch_delay_s=LONG_DELAY_S)
    results = submit_all(batcher, [1, 2, 3], Recorder(fail_item=2))
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and "item 2" in str(results[1])


def test_a_failing_batch_fails_every_member() -> None:
    batcher: Batcher[int, int] = Batcher(key=lambda item: "same", max_batch_size=3, max_batch_delay_s=LONG_DELAY_S)
    results = submit_all(batcher, [1, 2, 3], Recorder(raise_all=True))
    assert all(isinstance(result, RuntimeError) for result in results)


def test_invalid_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(key=lambda item: item, max_batch_size=0, max_batch_delay_s=0.0)


def test_img2img_key_separates_what_cannot_share_a_call() -> None:
    from PIL import Image

    def request(**changes: object) -> Img2ImgInput:
        fields: dict[str, object] = {
            "image": Image.new("RGB", (64, 64)),
            "prompt": "a fox",
            "negative_prompt": "",
            "strength": 0.75,
            "num_inference_steps": 8,
            "guidance_scale": 7.5,
            "seed": 1,
            "scheduler": "EULER",
            "preview_every_n_steps": 0,
        }
        fields.update(changes)
        return Img2ImgInput(**fields)  # type: ignore[arg-type]

    base = img2img_batch_key(request())
    # Per-request fields may differ inside one batch.
    assert img2img_batch_key(request(prompt="a cat", negative_prompt="blurry", seed=2, preview_every_n_steps=2)) == base
    for changes in (
        {"image": Image.new("RGB", (64, 72))},
        {"strength": 0.5},
        {"num_inference_steps": 9},
        {"guidance_scale": 1.0},
        {"scheduler": "DDIM"},
    ):
        assert img2img_batch_key(request(**changes)) != base, changes

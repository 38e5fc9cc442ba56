"""The device check (benchmarks/gpu/device_check.py): its CPU dry run covers every section and passes.

The script's real run needs a CUDA device; its dry run goes through the same code on the tiny models
(raw diffusers eager and compiled, the img2img and mesh servers over gRPC, the batching benchmark,
the per-point TripoSR baseline, the CUDA tests under pytest), so that the first GPU run does not
stop at a typo. Timings are printed, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu" / "device_check.py"


def load_script() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling random_models
    try:
        spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dry_run_covers_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--json", str(out), "--scratch", str(tmp_path / "scratch")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(done.stdout)  # the table, for the log (-s)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["failed"] == []
    assert {"gpu", "torch", "cuda", "diffusers", "wall time"} <= set(report["header"])
    rows = report["rows"]
    assert {row["section"] for row in rows} == {"setup", "img2img", "batching", "mesh", "tests"}
    what = {row["what"] for row in rows}
    for expected in (
        "raw eager: per image, batch 1",
        "raw compiled: per image, batch 1",
        "Kiln gRPC: one request end to end (PNG in, PNG out)",
        "plain per-point query (chunk 8192), image -> GLB 48^3",
        "Kiln gRPC: image -> GLB 48^3, no background removal",
    ):
        assert expected in what
        assert next(row for row in rows if row["what"] == expected)["seconds"] > 0
    # The batching benchmark ran (its rows, not the "absent" / "no run_device" notes).
    assert any(row["what"].startswith("batching on") for row in rows if row["section"] == "batching")
    checks = {row["what"]: row for row in rows if row["check"]}
    assert all(row["check"] == "ok" for row in checks.values())
    # CPU float32: the server's image is the eager pipeline's, pixel for pixel.
    parity = next(row for name, row in checks.items() if name.startswith("Kiln output vs raw eager"))
    assert parity["value"].startswith("mean 0.000, max 0 ")
    assert float(parity["value"].rsplit("ref. std ", 1)[1]) > 1.0  # a picture, not a blank image
    mesh = next(row for name, row in checks.items() if name.startswith("Kiln mesh vs plain"))
    served, plain = (int(n) for n in mesh["value"].split(" vertices")[0].split(" vs "))
    assert served > 1000 and abs(served - plain) <= 0.01 * plain
    tests = next(row for name, row in checks.items() if name.startswith("pytest"))
    assert "for want of CUDA" in tests["value"] and not tests["value"].startswith("0 passed, 0 skipped")
    assert "result: all checks passed" in done.stdout


def test_failed_check_fails_the_run() -> None:
    device_check = load_script()
    report = device_check.Report()
    report.add("img2img", "raw eager: per image, batch 1", 1.0, "1.00x (baseline)")
    report.check("mesh", "Kiln mesh vs plain", True, "10 vs 10 vertices")
    assert not report.failed and "all checks passed" in report.table()
    report.check("img2img", "Kiln output vs raw eager", False, "mean 9.000")
    assert report.failed == ["img2img: Kiln output vs raw eager (mean 9.000)"]
    assert "FAILED: img2img: Kiln output vs raw eager" in report.table()


def test_a_part_that_raises_is_a_failed_row_and_the_check_goes_on() -> None:
    device_check = load_script()
    report = device_check.Report()

    def broken() -> int:
        raise RuntimeError("no kernel image is available")

    assert device_check.guarded(report, "mesh", "plain baseline", broken) is None
    assert device_check.guarded(report, "tests", "CUDA tests", lambda: 7) == 7
    assert report.failed == ["mesh: plain baseline raised (RuntimeError: no kernel image is available)"]


def test_cuda_test_files_include_the_marked_ones() -> None:
    files = {path.relative_to(REPO).as_posix() for path in load_script().cuda_test_files()}
    assert "tests/unit/test_mc_torch.py" in files
    assert "tests/test_device_check.py" not in files  # this file names the reason without being a CUDA test


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_run_needs_cuda() -> None:
    assert load_script().main([]) == 2

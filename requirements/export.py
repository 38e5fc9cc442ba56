"""Write the pip-format exports of uv.lock that `make setup` and the service images install from.

    python requirements/export.py           # rewrite requirements/{torch,runtime,dev}.txt
    python requirements/export.py --check   # exit 1 when a committed export differs from uv.lock

uv.lock is the one source of versions. Its exports exist because the installers are pip (a
bare `python -m venv`, the images' Python): `runtime.txt` is what the servers need, `dev.txt`
adds the dev extra (tests, linters, code generation, uv itself). Both carry every wheel's hash
and environment markers, so one file serves every platform the lock covers.

torch and its CUDA-only libraries (triton, nvidia-*, cuda-*) are left out of both: which torch
wheel a machine wants (CUDA, CPU-only, macOS) is that machine's choice, made by the index it
installs from. `torch.txt` holds only the locked version, which `make setup` and the images
install first; everything else then goes in with `--no-deps --require-hashes`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "uv.lock"
OUT = ROOT / "requirements"
#: Packages that exist only to serve one torch build; matched by name so that a new CUDA library
#: in a later torch needs no edit here.
MACHINE_SPECIFIC_NAMES = ("torch", "triton")
MACHINE_SPECIFIC_PREFIXES = ("nvidia-", "cuda-")
HEADER = """\
# Exported from uv.lock by `make lock` (requirements/export.py): do not edit, run `make lock`.
# torch and its CUDA libraries are not here: install requirements/torch.txt first, from the
# index that fits the machine, then this file with `pip install --no-deps --require-hashes -r`.
"""
TORCH_HEADER = """\
# The torch version uv.lock pins, written by `make lock` (requirements/export.py). No hash: the
# wheel (CUDA, CPU-only, macOS) comes from the index that fits the machine (README, "Which torch wheel").
"""


def read_lock(path: Path = LOCK) -> dict[str, Any]:
    """The parsed lock file."""
    with path.open("rb") as file:
        return tomllib.load(file)


def machine_specific(lock: dict[str, Any]) -> list[str]:
    """Names in the lock that belong to a torch build (torch, triton, nvidia-*, cuda-*)."""
    names = {package["name"] for package in lock["package"]}
    return sorted(n for n in names if n in MACHINE_SPECIFIC_NAMES or n.startswith(MACHINE_SPECIFIC_PREFIXES))


def torch_requirement(lock: dict[str, Any]) -> str:
    """`torch==<version>` as the lock pins it (one version for every platform, or an error)."""
    versions = {package["version"] for package in lock["package"] if package["name"] == "torch"}
    if len(versions) != 1:
        raise SystemExit(f"uv.lock must pin exactly one torch version, found {sorted(versions) or 'none'}")
    return f"torch=={versions.pop()}"


def find_uv() -> str:
    """The uv executable: the one in this environment (the dev extra installs it), else from PATH."""
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        raise SystemExit("uv not found: `make lock` installs it into .venv (or `pip install uv`)")
    return found


def export_command(uv: str, lock: dict[str, Any], extra: str | None) -> list[str]:
    """The `uv export` call for the runtime set (extra None) or the set with an extra."""
    command = [
        uv,
        "export",
        "--frozen",  # the lock as it is: no resolution, no network
        "--offline",
        "--no-progress",
        "--format",
        "requirements.txt",
        "--no-header",
        "--no-emit-workspace",  # the two local packages are installed editable, on top
        *(f"--no-emit-package={name}" for name in machine_specific(lock)),
    ]
    if extra is not None:
        command += ["--extra", extra]
    return command


def exports(uv: str | None = None, root: Path = ROOT) -> dict[str, str]:
    """The three files as the lock in `root` gives them now, by file name.

    Args:
        uv: The uv executable; default `find_uv()`.
        root: The project folder (where uv.lock and pyproject.toml are).

    Returns:
        {"torch.txt": ..., "runtime.txt": ..., "dev.txt": ...}
    """
    uv = uv or find_uv()
    lock = read_lock(root / "uv.lock")
    result = {"torch.txt": TORCH_HEADER + torch_requirement(lock) + "\n"}
    for name, extra in (("runtime.txt", None), ("dev.txt", "dev")):
        done = subprocess.run(
            export_command(uv, lock, extra), cwd=root, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"uv export failed for {name}:\n{done.stderr}")
        result[name] = HEADER + done.stdout
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args()
    stale = []
    for name, text in exports().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"requirements/{', '.join(stale)} differ from uv.lock: run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

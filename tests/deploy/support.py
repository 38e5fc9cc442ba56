"""Helpers for the deploy checks: paths, a small Dockerfile reader, kustomize, setting names."""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel

from kiln_img2img.config import Img2ImgSettings
from kiln_mesh.config import MeshSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "cpu-s3", "gpu-s3")
#: The overlays that keep artifacts in an S3-compatible bucket (components/s3), not on a volume.
S3_OVERLAYS = ("cpu-s3", "gpu-s3")
#: The overlays with TLS everywhere (components/tls): probes and the gateway's config differ.
TLS_OVERLAYS = ("gpu-tls",)
MODEL_SERVERS = ("img2img", "mesh")
#: One Dockerfile for both model servers (build args SERVICE and VARIANT), one for the gateway.
DOCKERFILES = {name: DOCKER / f"{name}.Dockerfile" for name in ("server", "gateway")}
SERVER_DOCKERFILE = DOCKERFILES["server"]
VARIANTS = ("gpu", "cpu")
#: Oldest Kubernetes the manifests are written for: native gRPC probes (1.27), the preStop
#: `sleep` action (beta, on by default, 1.30), PDB unhealthyPodEvictionPolicy (1.31).
K8S_MIN_VERSION = "1.32"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), arguments, and 1-based line."""

    keyword: str
    args: str
    line: int

    def words(self) -> list[str]:
        """The arguments as a list: JSON (exec) form as written, shell form split like sh."""
        text = self.args.strip()
        if text.startswith("["):
            value: list[str] = json.loads(text)
            return value
        return shlex.split(text)


def read_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments (incl. parser directives) dropped."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: a continuation line never ends"
    return instructions


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Instructions per build stage, keyed by the stage's alias ("" for the unnamed final stage)."""
    result: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.words()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            current = result.setdefault(alias, [])
        current.append(instruction)
    return result


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """Every ENV key=value of the instructions (later ones win)."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in instruction.words():
                key, _, value = word.partition("=")
                env[key] = value
    return env


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
#: Instructions whose arguments Docker expands with ARG and ENV values while building.
_EXPANDED = frozenset({"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"})


def _expand(text: str, known: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced where known; others (the base image's PATH) stay as written."""
    return _VARIABLE.sub(lambda m: known.get(m.group(1) or m.group(2), m.group(0)), text)


@dataclass(frozen=True)
class Image:
    """What `docker build --build-arg ... [--target ...]` would make of a multi-stage Dockerfile,
    as far as reading it tells: the stages it runs through and their instructions, expanded."""

    #: The external image the chain starts from, e.g. nvidia/cuda:...
    base: str
    #: The stages from the first one on `base` to the target ("" for an unnamed final stage).
    chain: tuple[str, ...]
    #: Every instruction of those stages in build order (FROM lines included), ARG and ENV
    #: values expanded in the instructions Docker expands.
    instructions: tuple[Instruction, ...]
    #: The environment the image ends with (its base image's own variables aside).
    env: dict[str, str]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The instruction that counts for CMD, HEALTHCHECK, USER...: the last one of the chain."""
        found = self.all(keyword)
        assert found, f"no {keyword} in stages {self.chain}"
        return found[-1]


def render_image(path: Path, build_args: dict[str, str], target: str = "") -> Image:
    """Follow `FROM` from `target` (default: the last stage) back to an external image and replay
    the chain as Docker does: global ARGs only in FROM lines, a stage sees an ARG only after
    declaring it, ENV carries into the stages built on it, and later instructions win."""
    instructions = read_dockerfile(path)
    global_args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            key, _, value = instruction.args.partition("=")
            global_args[key] = build_args.get(key, value)
    by_stage = stages(instructions)
    names = list(by_stage)
    chain = [target if target else names[-1]]
    while True:
        parent = _expand(by_stage[chain[0]][0].words()[0], global_args)
        assert "$" not in parent, f"{path.name}: FROM {parent} names an undeclared build argument"
        if parent not in by_stage or names.index(parent) >= names.index(chain[0]):
            break  # an image, not an earlier stage
        chain.insert(0, parent)
    env: dict[str, str] = {}
    replayed: list[Instruction] = []
    for stage in chain:
        args: dict[str, str] = {}
        for instruction in by_stage[stage]:
            # In a stage, ENV wins over an ARG of the same name; FROM sees only the global ARGs.
            known = global_args if instruction.keyword == "FROM" else {**args, **env}
            text = _expand(instruction.args, known) if instruction.keyword in _EXPANDED else instruction.args
            expanded = Instruction(instruction.keyword, text, instruction.line)
            replayed.append(expanded)
            if instruction.keyword == "ARG":
                key, has_default, value = instruction.args.partition("=")
                args[key] = build_args.get(key, value if has_default else global_args.get(key, ""))
            elif instruction.keyword == "ENV":
                for word in expanded.words():
                    key, _, value = word.partition("=")
                    env[key] = value
    return Image(base=parent, chain=tuple(chain), instructions=tuple(replayed), env=env)


def server_image(service: str, variant: str = "gpu") -> Image:
    """The model server image `SERVICE=service VARIANT=variant` builds."""
    return render_image(SERVER_DOCKERFILE, {"SERVICE": service, "VARIANT": variant})


def kubectl() -> str:
    """The kubectl binary, or a skip that says how to get it (CI and the dev machine have it)."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not found: these checks render the overlays with `kubectl kustomize` (install kubectl)")
    return path


@functools.cache
def _kustomize(overlay: str) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}"
    return result.stdout


def render_overlay(overlay: str) -> list[dict[str, Any]]:
    """The overlay's manifests as `kubectl kustomize` renders them (rendered once per session)."""
    return [doc for doc in yaml.safe_load_all(_kustomize(overlay)) if doc]


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one manifest of `kind` whose name is `name` (generated names keep their hash suffix)."""
    matches = [
        m
        for m in manifests
        if m["kind"] == kind and (m["metadata"]["name"] == name or m["metadata"]["name"].startswith(f"{name}-"))
    ]
    assert len(matches) == 1, f"expected one {kind} {name}, found {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (match,) = [c for c in containers if c["name"] == name]
    result: dict[str, Any] = match
    return result


def env_value(container_spec: dict[str, Any], name: str) -> str | None:
    for item in container_spec.get("env", []):
        if item["name"] == name:
            value: str = item["value"]
            return value
    return None


#: The settings root each KILN_ section belongs to.
_SETTINGS: dict[str, type[BaseModel]] = {"IMG2IMG": Img2ImgSettings, "MESH": MeshSettings}


def is_setting(env_name: str) -> bool:
    """Whether `env_name` (KILN_A__B__C) names a field of the servers' settings.

    Walks the pydantic models field by field, so a misspelt or invented name (which
    pydantic-settings would silently ignore) is caught.
    """
    if not env_name.startswith("KILN_"):
        return False
    path = env_name.removeprefix("KILN_").lower().split("__")
    roots = [_SETTINGS[path[0].upper()]] if path[0].upper() in _SETTINGS else list(_SETTINGS.values())
    return any(_has_path(root, path) for root in roots)


def _has_path(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    annotation = field.annotation
    return isinstance(annotation, type) and issubclass(annotation, BaseModel) and _has_path(annotation, path[1:])

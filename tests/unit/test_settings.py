from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError

from kiln_img2img.config import Img2ImgSettings
from kiln_mesh.config import MeshSettings
from kiln_runtime import settings as settings_module
from kiln_runtime.settings import (
    KilnSettings,
    LimitsSettings,
    RuntimeSettings,
    ServerSettings,
    ServiceSettings,
    StorageSettings,
    TelemetrySettings,
)


class _S(KilnSettings):
    svc: ServiceSettings = Field(default_factory=ServiceSettings, description="x")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    # Settings read the process environment and ./.env: start every test from neither.
    for name in list(os.environ):
        if name.upper().startswith("KILN_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults() -> None:
    s = KilnSettings()
    assert s.offline is False
    assert s.profile == "default"
    assert s.storage == StorageSettings()
    assert s.storage.resolved_output_dir == Path("data") / "outputs"
    assert s.telemetry.log_format == "json"
    assert s.telemetry.log_level == "INFO"


def test_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_OFFLINE", "1")
    monkeypatch.setenv("KILN_STORAGE__OUTPUT_DIR", "/tmp/x")
    monkeypatch.setenv("KILN_TELEMETRY__LOG_FORMAT", "text")
    s = KilnSettings()
    assert s.offline is True
    assert s.storage.output_dir == Path("/tmp/x")
    assert s.storage.resolved_output_dir == Path("/tmp/x")
    assert s.telemetry.log_format == "text"
    assert s.telemetry.log_level == "INFO"  # untouched sibling keeps its default


def test_nested_partial_update_keeps_other_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_STORAGE__PUBLIC_BASE_URL", "https://cdn.example/kiln")
    storage = KilnSettings().storage
    assert storage.public_base_url == "https://cdn.example/kiln"
    assert storage.model_dump(exclude={"public_base_url"}) == StorageSettings().model_dump(exclude={"public_base_url"})


def test_dotenv_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    (clean_env / ".env").write_text(
        "KILN_PROFILE=tiny\nKILN_TELEMETRY__LOG_LEVEL=DEBUG\nKILN_STORAGE__MAX_INLINE_BYTES=1024\n"
    )
    monkeypatch.setenv("KILN_TELEMETRY__LOG_LEVEL", "ERROR")
    s = KilnSettings()
    assert s.profile == "tiny"  # from .env
    assert s.storage.max_inline_bytes == 1024  # nested, from .env
    assert s.telemetry.log_level == "ERROR"  # the environment wins over .env


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KILN_TELEMETRY__LOG_LEVEL", "LOUD"),
        ("KILN_TELEMETRY__LOG_FORMAT", "xml"),
        ("KILN_PROFILE", "huge"),
        ("KILN_STORAGE__MAX_INLINE_BYTES", "0"),
        ("KILN_OFFLINE", "maybe"),
    ],
)
def test_invalid_values_raise(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        KilnSettings()


def test_service_ports_must_differ() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        ServiceSettings(server=ServerSettings(port=9000, metrics_port=9000))


def test_service_port_zero_may_equal_metrics_port_zero() -> None:
    # Port 0 means "pick a free one" for both, so two zeros are not a clash.
    ServiceSettings(server=ServerSettings(port=0, metrics_port=0))


@pytest.mark.parametrize("port", [-1, 65536])
def test_port_range(port: int) -> None:
    with pytest.raises(ValidationError):
        ServerSettings(port=port)


def test_service_section_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_SVC__SERVER__PORT", "6000")
    monkeypatch.setenv("KILN_SVC__RUNTIME__MAX_QUEUE", "3")
    s = _S()
    assert s.svc.server.port == 6000
    assert s.svc.runtime.max_queue == 3
    # Partial update: the rest of the section keeps its defaults.
    assert s.svc.server.metrics_port == ServerSettings().metrics_port
    assert s.svc.runtime == RuntimeSettings(max_queue=3)
    assert s.svc.limits == LimitsSettings()


def test_service_section_validator_runs_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_SVC__SERVER__PORT", "7000")
    monkeypatch.setenv("KILN_SVC__SERVER__METRICS_PORT", "7000")
    with pytest.raises(ValidationError, match="must differ"):
        _S()


def _model_classes() -> set[type[BaseModel]]:
    """Every settings model: those defined in settings.py, and every model reachable from them."""
    found: set[type[BaseModel]] = set()
    pending = [
        cls
        for _, cls in inspect.getmembers(settings_module, inspect.isclass)
        if issubclass(cls, BaseModel) and cls.__module__ == settings_module.__name__
    ]
    while pending:
        cls = pending.pop()
        if cls in found:
            continue
        found.add(cls)
        for field in cls.model_fields.values():
            annotation = field.annotation
            if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
                pending.append(annotation)
    return found


def _model_id(model: object) -> str:
    return getattr(model, "__name__", repr(model))


def test_model_walk_finds_the_known_models() -> None:
    assert {KilnSettings, ServiceSettings, ServerSettings, RuntimeSettings, TelemetrySettings} <= _model_classes()


@pytest.mark.parametrize("model", sorted(_model_classes(), key=_model_id), ids=_model_id)
def test_every_field_is_described(model: type[BaseModel]) -> None:
    undescribed = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not undescribed, f"{model.__name__} fields without a description: {undescribed}"


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("true", True), ("0", False), ("", False)])
def test_hf_hub_offline_turns_offline_on(monkeypatch: pytest.MonkeyPatch, value: str, offline: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert KilnSettings().offline is offline


@pytest.mark.parametrize(
    ("variable", "value", "port", "metrics_port"),
    [
        (None, None, 50052, 9092),
        ("KILN_MESH__PROVIDER", "fake", 50052, 9092),  # another key of the section keeps the ports
        ("KILN_MESH__SERVER__PORT", "6000", 6000, 9092),
    ],
)
def test_mesh_keeps_its_own_ports_under_partial_environment(
    monkeypatch: pytest.MonkeyPatch,
    clean_env: Path,
    variable: str | None,
    value: str | None,
    port: int,
    metrics_port: int,
) -> None:
    if variable is not None and value is not None:
        monkeypatch.setenv(variable, value)
    settings = MeshSettings()
    assert (settings.mesh.server.port, settings.mesh.server.metrics_port) == (port, metrics_port)
    assert Img2ImgSettings().img2img.server.port == 50051
